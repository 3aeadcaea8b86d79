"""The SMTP sink: accepts and counts every message, keeps none (the bench measures senders).

Run as `python -m bench.sink --port N --control-port M`: a process of its own, serving SMTP with
the project's `app.mailsink.start_smtp_server`. `GET /count` on the control port says how many
messages were accepted, `POST /reset` zeroes that.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web
from aiosmtpd.smtp import SMTP, Envelope, Session

from app.mailsink import start_smtp_server


class CountingHandler:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.count += 1
        return "250 OK"


def control_app(handler: CountingHandler) -> web.Application:
    async def count(request: web.Request) -> web.Response:
        return web.json_response({"count": handler.count})

    async def reset(request: web.Request) -> web.Response:
        handler.count = 0
        return web.json_response({"count": 0})

    app = web.Application()
    app.router.add_get("/count", count)
    app.router.add_post("/reset", reset)
    return app


async def serve(port: int, control_port: int) -> None:
    handler = CountingHandler()
    smtp = await start_smtp_server(handler, port=port)
    runner = web.AppRunner(control_app(handler), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", control_port).start()
    async with smtp:
        await smtp.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sink", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.control_port))


if __name__ == "__main__":
    main()
