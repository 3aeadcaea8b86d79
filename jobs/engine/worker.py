"""`EngineWorker`: arq's Worker with this project's engine, for workers built from our settings.

`worker_settings.WorkerSettings` names it in `worker_class`, which arq's CLI builds (see
`asyncjobs.arqcompat.take_over_arq_cli`); any other settings class (another queue, a user's own
functions) gets arq's plain Worker, even in the same process. It subclasses
`asyncjobs.arqcompat.SeamWorker`, whose hooks stand for the private parts of arq's Worker. It
changes:

1. Claims, runs and finishes go through jobs/engine/runner.py (a few Lua scripts per poll instead
   of about ten round trips per job).
2. Leases: arq marks a running job "in progress" for job_timeout + 10 s (310 s by default), so
   the job of a SIGKILLed worker waits that long to run again. Here the mark (and the job's
   hidden score in the queue) lasts `job_lease_seconds` (15 s) and the engine renews it every
   second for the jobs it runs, so a dead worker's jobs run again within the lease, while a
   long, healthy job is never taken from its worker.
3. Wake-ups: instead of sleeping `poll_delay` between polls, the poll loop waits on an event that
   is set when a producer signals an enqueue (a blocking BLPOP on `<queue>:wake`) or a job of
   this worker ends (a slot is free). Producers that use plain arq still get picked up within
   `poll_delay`.
4. Surviving a Redis restart instead of crashing. arq 0.28 and redis-py 5 leave two gaps, both
   seen in tests/faults/test_redis_restart.py:
- redis-py retries the socket connect but not the handshake after it, so a connection reset by a
  Redis that is shutting down or starting fails the command at once: `HandshakeRetryingConnection`.
- any Redis error inside arq's poll loop (a WATCH interrupted by the restart, for one) ends the
  worker's main task and so the process: `EngineWorker.poll_turn` logs, waits, polls again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any
from urllib.parse import urlsplit

from arq.connections import ArqRedis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from asyncjobs.arqcompat import SeamWorker
from asyncjobs.context import SETTINGS
from asyncjobs.keys import wake_key
from asyncjobs.redis import redis_pool, redis_settings
from asyncjobs.settings import Settings
from asyncjobs.speedups import HiredisPackingConnection, redis_pool_options
from jobs.engine.runner import Engine, wake_state, wake_up

log = logging.getLogger(__name__)

HANDSHAKE_ATTEMPTS = 3
MIN_POLL_GAP_S = 0.01
POLL_ERROR_PAUSE_S = 0.5
DEFAULT_LEASE_S = Settings.model_fields["job_lease_seconds"].default


class HandshakeRetryingConnection(HiredisPackingConnection):
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
    extra: dict[str, Any] = redis_pool_options(settings.redis_url)
    if urlsplit(settings.redis_url).scheme == "redis":  # TLS and sockets keep their own classes
        extra["connection_class"] = HandshakeRetryingConnection
    pool = redis_pool(
        settings,
        socket_connect_timeout=rs.conn_timeout,
        retry=rs.retry,
        retry_on_error=rs.retry_on_error,
        **extra,
    )
    return ArqRedis(pool, default_queue_name=settings.queue_name)


class WakeListener:
    """Blocks on `<queue>:wake` with a connection of its own and wakes the poll loop."""

    def __init__(self, settings: Settings) -> None:
        pool = redis_pool(
            settings,
            socket_connect_timeout=settings.redis_timeout,
            **redis_pool_options(settings.redis_url),
        )
        self._redis = Redis(connection_pool=pool)
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
                if await self._redis.blpop([self._key], timeout=1):  # type: ignore[misc]
                    wake_up()
            except (RedisError, OSError):  # Redis restarting: plain polling covers us
                await asyncio.sleep(1)


class EngineWorker(SeamWorker):
    """arq's Worker with this project's engine. Built only for settings that name it
    (`worker_class`, see asyncjobs.arqcompat): a plain `arq.worker.Worker` in the same process
    keeps arq's own poll loop, in-progress marks and close."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The lease comes from the worker's own settings (its ctx), so two workers in one
        # process (tests) each keep theirs.
        settings = self.ctx.get(SETTINGS)
        lease = settings.job_lease_seconds if isinstance(settings, Settings) else DEFAULT_LEASE_S
        self.in_progress_timeout_s = min(self.in_progress_timeout_s, lease)
        # arq's main loop sleeps poll_delay between iterations; here the wait moves into
        # `poll_turn`, where a wake-up cuts it short. arq's cron window is
        # max(poll_delay, 0.5) and our poll_delay is below 0.5, so crons see no change.
        self.poll_step_s = self.poll_delay_s
        self.poll_delay_s = 0
        self._last_poll: float | None = None
        self.engine = Engine(self)  # after the lease: the engine claims with it

    async def poll_turn(self) -> None:
        """One poll by jobs/engine/runner.py; a Redis error is logged and the loop polls again."""
        await self._wait_for_poll()
        try:
            await self.engine.poll()
        except (RedisError, OSError) as exc:
            log.warning(
                "Redis unavailable while polling (%s: %s); trying again", type(exc).__name__, exc
            )
            await asyncio.sleep(POLL_ERROR_PAUSE_S)

    async def _wait_for_poll(self) -> None:
        """Wait the poll step, or until the next deferred job is due, cut short by a wake-up.
        Wake-ups closer together than
        MIN_POLL_GAP_S are merged: a busy worker frees a slot every few hundred microseconds,
        and polling for each would cost more Redis work than it saves; an idle one wakes at
        once."""
        loop = asyncio.get_running_loop()
        last, self._last_poll = self._last_poll, loop.time()
        if last is None:  # the first poll runs at once
            return
        state = wake_state()
        wait = max(0.0, self.poll_step_s - (loop.time() - last))
        next_due_ms = self.engine.next_due_ms
        if next_due_ms is not None:  # a deferred job falls due before the next poll
            wait = min(wait, max(0.0, next_due_ms / 1000 - time.time()))
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as its timeout fires, and the worker would never stop (seen in tests).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await state.event.wait()
        state.event.clear()
        gap = loop.time() - last
        if gap < MIN_POLL_GAP_S and state.running:
            await asyncio.sleep(MIN_POLL_GAP_S - gap)
        self._last_poll = loop.time()

    async def wait_for_jobs(self) -> None:
        """Wait for every job task whatever way it ended, then for the engine's last writes.
        arq gathers the tasks without `return_exceptions`, so one task that ended cancelled
        (stopped before it ran) raised CancelledError out of `close`: the shutdown hook never
        ran, the Redis pool and HTTP session stayed open, and the jobs the task held stayed
        hidden until their leases ended."""
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        await self.engine.drain()
