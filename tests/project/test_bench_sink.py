"""The bench's SMTP sink speaks enough SMTP for real clients and counts every message once."""

from __future__ import annotations

import asyncio
from email.message import EmailMessage

import aiosmtplib

from bench.sink import CountingHandler, SinkProtocol


async def test_sink_counts_messages_sent_over_one_connection() -> None:
    handler = CountingHandler()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SinkProtocol(handler), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=5)
        async with client:
            bodies = ["plain", ".\nstarts with a dot\n.\n", "x" * 200_000]  # dot-stuffing, size
            for body in bodies:
                message = EmailMessage()
                message["From"], message["To"], message["Subject"] = "a@x.org", "b@x.org", "s"
                message.set_content(body)
                errors, response = await client.send_message(message)
                assert errors == {} and response.startswith("OK")
            await client.rset()
            await client.noop()
        assert handler.count == len(bodies)
    finally:
        server.close()
        await server.wait_closed()
