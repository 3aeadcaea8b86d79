"""The SMTP sink: accepts and counts every message, keeps none (the bench measures senders).

Run as `python -m bench.sink --port N --control-port M`: a process of its own. `GET /count` on
the control port says how many messages were accepted, `POST /reset` zeroes that.

It speaks just enough SMTP for a client that sends mail (EHLO/HELO, MAIL, RCPT, DATA, RSET,
NOOP, QUIT; PIPELINING, as Postfix and Exim say it) with an asyncio protocol of its own instead
of aiosmtpd: aiosmtpd parses and checks every command and message (about 1 ms of CPU per message
here), and the sink shares the machine's cores with the engine under test, so at 1,000 messages
per second it would take a core from the sender it is there to measure. The project's tests use
aiosmtpd (app/mailsink.py), which checks what a real server checks.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

END_OF_DATA = b"\r\n.\r\n"
REPLIES = {
    b"EHLO": b"250-bench-sink\r\n250-8BITMIME\r\n250-PIPELINING\r\n250 SIZE 67108864\r\n",
    b"HELO": b"250 bench-sink\r\n",
    b"MAIL": b"250 OK\r\n",
    b"RCPT": b"250 OK\r\n",
    b"RSET": b"250 OK\r\n",
    b"NOOP": b"250 OK\r\n",
    b"DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    b"QUIT": b"221 Bye\r\n",
}


class CountingHandler:
    def __init__(self) -> None:
        self.count = 0


class SinkProtocol(asyncio.Protocol):
    """One SMTP session: reply to commands, count each message at the end of its DATA."""

    def __init__(self, handler: CountingHandler) -> None:
        self.handler = handler
        self.buffer = b""
        self.in_data = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 bench-sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and self._step(self.transport):
            pass

    def _step(self, transport: asyncio.Transport) -> bool:
        """Handle one command or one message from the buffer; False when it needs more."""
        if self.in_data:
            # the data starts right after the 354 reply: an empty message is just ".\r\n"
            end = -2 if self.buffer.startswith(b".\r\n") else self.buffer.find(END_OF_DATA)
            if end == -1:
                return False
            self.buffer = self.buffer[end + len(END_OF_DATA) :]
            self.in_data = False
            self.handler.count += 1
            transport.write(b"250 OK\r\n")
            return True
        line, found, rest = self.buffer.partition(b"\r\n")
        if not found:
            return False
        self.buffer = rest
        verb = line[:4].upper()
        transport.write(REPLIES.get(verb, b"502 Command not implemented\r\n"))
        if verb == b"DATA":
            self.in_data = True
        elif verb == b"QUIT":
            transport.close()
            return False
        return True


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
    loop = asyncio.get_running_loop()
    smtp = await loop.create_server(lambda: SinkProtocol(handler), "127.0.0.1", port)
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
