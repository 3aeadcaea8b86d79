"""Slow clients are timed out: a body that does not arrive is a 408, an idle keep-alive
connection is closed. (Headers that trickle in are a reverse proxy's job: docs/operations.md.)"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

import pytest

from asyncjobs.settings import Settings
from tests.conftest import API_KEY
from tests.helpers import served

BODY_TIMEOUT_S = 1.0
KEEPALIVE_S = 1.0
SOCKETS = 50


@pytest.fixture
async def port(make_settings: Callable[..., Settings]) -> AsyncIterator[int]:
    """The app served as production serves it (app_runner), on a loopback port."""
    settings = make_settings(http_body_timeout=BODY_TIMEOUT_S, http_keepalive_timeout=KEEPALIVE_S)
    async with served(settings) as served_port:
        yield served_port


async def slow_body(port: int) -> tuple[bytes, bytes, float]:
    """Headers promising 100 bytes, 5 of them, then nothing: the response's head and body, and
    how long the head took."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(
        b"POST /jobs/email HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + API_KEY.encode() + b'\r\nContent-Length: 100\r\n\r\n{"to"'
    )
    await writer.drain()
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BODY_TIMEOUT_S + 10)
        took = time.monotonic() - started
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()
    return head, body, took


async def test_bodies_that_do_not_arrive_are_a_408_for_every_slow_socket(port: int) -> None:
    """Before, 200 sockets sending bodies slowly were all still open after 60 s."""
    results = await asyncio.gather(*(slow_body(port) for _ in range(SOCKETS)))
    for head, body, took in results:
        assert head.startswith(b"HTTP/1.1 408"), head
        assert json.loads(body)["error"] == "request_timeout"
        assert BODY_TIMEOUT_S * 0.9 <= took < BODY_TIMEOUT_S + 10


async def test_an_idle_keep_alive_connection_is_closed(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 "), head
        answered = time.monotonic()
        rest = await asyncio.wait_for(reader.read(), KEEPALIVE_S + 10)  # to EOF: closed
        idle = time.monotonic() - answered
    finally:
        writer.close()
    assert rest  # the response's body came, then the connection was closed
    assert idle < KEEPALIVE_S + 10
