"""Keep a worker alive through a Redis restart instead of letting it crash.

arq 0.28 and redis-py 5 leave two gaps, both seen in tests/faults/test_redis_restart.py:
- redis-py retries the socket connect but not the handshake after it, so a connection reset by a
  Redis that is shutting down or starting fails the command at once: `HandshakeRetryingConnection`.
- any Redis error inside arq's poll loop (a WATCH interrupted by the restart, for one) ends the
  worker's main task and so the process: `install()` makes the loop log, wait and poll again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from arq.connections import ArqRedis
from arq.worker import Worker
from redis.asyncio import Connection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from app.broker import redis_settings
from app.settings import Settings

log = logging.getLogger(__name__)

HANDSHAKE_ATTEMPTS = 3
POLL_ERROR_PAUSE_S = 0.5


class HandshakeRetryingConnection(Connection):
    async def connect(self) -> None:
        for attempt in range(1, HANDSHAKE_ATTEMPTS + 1):
            try:
                await super().connect()  # type: ignore[no-untyped-call]
                return
            except RedisConnectionError:
                if attempt == HANDSHAKE_ATTEMPTS:
                    raise
                await asyncio.sleep(0.1 * attempt)


def worker_redis(settings: Settings) -> ArqRedis:
    """The worker's client: arq's retry settings, plus handshake retries on plain redis:// URLs."""
    rs = redis_settings(settings)
    extra: dict[str, Any] = {}
    if urlsplit(settings.redis_url).scheme == "redis":  # TLS and sockets keep their own classes
        extra["connection_class"] = HandshakeRetryingConnection
    pool = ConnectionPool.from_url(
        settings.redis_url,
        socket_connect_timeout=rs.conn_timeout,
        retry=rs.retry,
        retry_on_error=rs.retry_on_error,
        **extra,
    )
    return ArqRedis(pool, default_queue_name=settings.queue_name)


_arq_poll_iteration: Callable[[Worker], Awaitable[None]] = Worker._poll_iteration


async def _poll_iteration_surviving_redis_errors(self: Worker) -> None:
    try:
        await _arq_poll_iteration(self)
    except (RedisError, OSError) as exc:
        log.warning(
            "Redis unavailable while polling (%s: %s); trying again", type(exc).__name__, exc
        )
        await asyncio.sleep(POLL_ERROR_PAUSE_S)


def install() -> None:
    """Patch arq's Worker in this process (arq is pinned to 0.28.x, where this was checked)."""
    Worker._poll_iteration = _poll_iteration_surviving_redis_errors  # type: ignore[method-assign]
