"""Small test utilities: waiting on conditions with a deadline instead of sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

if TYPE_CHECKING:
    from asyncjobs.settings import Settings

T = TypeVar("T")

# The aiohttp test client for our app, with its generic parameters spelled once.
ApiClient = TestClient[web.Request, web.Application]


async def wait_for(
    check: Callable[[], Awaitable[T | None]],
    *,
    timeout: float = 15.0,
    interval: float = 0.02,
    what: str = "",
) -> T:
    """Poll `check` until it returns a truthy value; fail the test when `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or check}")
        await asyncio.sleep(interval)


async def start_of_a_window(seconds: float) -> int:
    """Wait until a fixed window of `seconds` (as the rate limits count them) has just begun,
    so a short burst of requests lands in one window whichever side of a boundary the test
    started on; the window's number. The caller asserts that its burst stayed inside it."""

    async def early() -> bool:
        return time.time() % seconds < seconds / 8

    await wait_for(early, timeout=seconds + 1, interval=0.01, what="the start of a window")
    return window_number(seconds)


def window_number(seconds: float) -> int:
    return int(time.time() // seconds)


def api_client(app: web.Application) -> ApiClient:
    """A client of the real app on a loopback port, sending the tests' full-access API key."""
    from tests.conftest import AUTH

    return TestClient(TestServer(app, host="127.0.0.1"), headers=AUTH)


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[int]:
    """The app served as production serves it (app_runner), on a loopback port: the port."""
    from app.web import app_runner

    runner = app_runner(settings)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield int(runner.addresses[0][1])
    finally:
        await runner.cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
