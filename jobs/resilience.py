"""Changes to arq's worker engine, installed by `install()` in each worker process.

1. Claims, runs and finishes go through jobs/engine.py (a few Lua scripts per poll instead of
   about ten round trips per job).
2. Leases: arq marks a running job "in progress" for job_timeout + 10 s (310 s by default), so
   the job of a SIGKILLed worker waits that long to run again. Here the mark (and the job's
   hidden score in the queue) lasts `lease_seconds` (15 s) and the engine renews it every second
   for the jobs it runs, so a dead worker's jobs run again within the lease, while a long,
   healthy job is never taken from its worker.
3. Wake-ups: instead of sleeping `poll_delay` between polls, the poll loop waits on an event that
   is set when a producer signals an enqueue (a blocking BLPOP on `<queue>:wake`) or a job of
   this worker ends (a slot is free). Producers that use plain arq still get picked up within
   `poll_delay`.
4. Surviving a Redis restart instead of crashing. arq 0.28 and redis-py 5 leave two gaps, both
   seen in tests/faults/test_redis_restart.py:
- redis-py retries the socket connect but not the handshake after it, so a connection reset by a
  Redis that is shutting down or starting fails the command at once: `HandshakeRetryingConnection`.
- any Redis error inside arq's poll loop (a WATCH interrupted by the restart, for one) ends the
  worker's main task and so the process: `install()` makes the loop log, wait and poll again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import arq.worker
from arq.connections import ArqRedis
from arq.worker import Worker
from redis.asyncio import Connection, ConnectionPool, Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from app.broker import redis_settings
from app.settings import Settings
from jobs.engine import engine_of, wake_state, wake_up
from jobs.queue import wake_key

log = logging.getLogger(__name__)

HANDSHAKE_ATTEMPTS = 3
MIN_POLL_GAP_S = 0.01
POLL_ERROR_PAUSE_S = 0.5
DEFAULT_LEASE_S = Settings.model_fields["job_lease_seconds"].default


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


async def _poll_iteration(self: Worker) -> None:
    """One poll by jobs/engine.py; a Redis error is logged and the loop polls again."""
    try:
        await engine_of(self).poll()
    except (RedisError, OSError) as exc:
        log.warning(
            "Redis unavailable while polling (%s: %s); trying again", type(exc).__name__, exc
        )
        await asyncio.sleep(POLL_ERROR_PAUSE_S)


_arq_init = Worker.__init__


@functools.wraps(_arq_init)  # arq's CLI reads the parameters from the signature
def _init_with_lease(self: Worker, *args: Any, **kwargs: Any) -> None:
    """The lease comes from the worker's own settings (its ctx), not from the process: two
    workers in one process (tests) each keep theirs."""
    _arq_init(self, *args, **kwargs)
    settings = self.ctx.get("settings")
    lease = settings.job_lease_seconds if isinstance(settings, Settings) else DEFAULT_LEASE_S
    self.in_progress_timeout_s = min(self.in_progress_timeout_s, lease)


async def _poll_or_wake(step: float) -> AsyncIterator[float]:
    """arq's `poll`, except that a wake-up cuts the wait short. Wake-ups closer together than
    MIN_POLL_GAP_S are merged: a busy worker frees a slot every few hundred microseconds, and
    polling for each would cost more Redis work than it saves; an idle one wakes at once."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        before = loop.time()
        yield before - start
        wait = max(0.0, step - (loop.time() - before))
        state = wake_state()
        event = state.event
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as its timeout fires, and the worker would never stop (seen in tests).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await event.wait()
        event.clear()
        gap = loop.time() - before
        if gap < MIN_POLL_GAP_S and state.running:
            await asyncio.sleep(MIN_POLL_GAP_S - gap)


async def _close(self: Worker) -> None:
    """arq's `close`, except that it waits for every job task whatever way it ended, then for
    the engine's last writes. arq gathers the tasks without `return_exceptions`, so one task
    that ended cancelled (stopped before it ran) raised CancelledError out of `close`: the
    shutdown hook never ran, the Redis pool and HTTP session stayed open, and the jobs the
    task held stayed hidden until their leases ended."""
    if not self._handle_signals:
        self.handle_sig(signal.SIGUSR1)
    if not self._pool:
        return
    await asyncio.gather(*self.tasks.values(), return_exceptions=True)
    await engine_of(self).drain()
    await self.pool.delete(self.health_check_key)
    if self.on_shutdown:
        await self.on_shutdown(self.ctx)
    await self.pool.aclose(close_connection_pool=True)
    self._pool = None


class WakeListener:
    """Blocks on `<queue>:wake` with a connection of its own and wakes the poll loop."""

    def __init__(self, settings: Settings) -> None:
        self._redis = Redis.from_url(
            settings.redis_url, socket_connect_timeout=settings.redis_timeout
        )
        self._key = wake_key(settings.queue_name)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="wake-listener")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._redis.aclose()

    async def _listen(self) -> None:
        while True:
            try:
                if await self._redis.blpop([self._key], timeout=1):
                    wake_up()
            except (RedisError, OSError):  # Redis restarting: plain polling covers us
                await asyncio.sleep(1)


def install() -> None:
    """Patch arq's Worker in this process (arq is pinned to 0.28.x, where this was checked).
    Idempotent; holds no state of its own."""
    Worker.__init__ = _init_with_lease  # type: ignore[method-assign]
    Worker._poll_iteration = _poll_iteration  # type: ignore[method-assign]
    Worker.close = _close  # type: ignore[method-assign]
    arq.worker.poll = _poll_or_wake  # type: ignore[attr-defined,assignment]
