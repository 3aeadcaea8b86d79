"""Per-host politeness shared by every job in every worker: a concurrency limit and a minimum
delay between request starts to the same host, both enforced atomically in Redis (one Lua script).

A job never waits long for its host while holding a worker slot. Its first request books a turn
(a start time, one delay after the previous turn); when the turn is further away than a short
wait in place, the job raises `Postpone` and the worker puts it back in the queue until then,
without counting a try. Turns are kept in Redis per job, so a job keeps its place in line across
postponements and worker restarts. Requests that cannot be postponed (robots.txt, redirect hops,
calls outside a worker) wait in place, bounded, and go ahead of booked turns."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from asyncjobs.errors import Postpone, TransientJobError
from asyncjobs.keys import HOST_KEY_PREFIX
from asyncjobs.luascript import LuaScript
from asyncjobs.settings import Settings

MAX_WAIT_STEP_S = 0.5
# A job waits in place for at most this long (a claim is ~poll_delay late anyway); longer and it
# gives its slot back. It is claimed again this much before its turn, to be on time.
WAIT_IN_PLACE_S = 0.5
WAKE_EARLY_S = 0.1
BUSY_RETRY_MS = 500  # a job due while the host is at its concurrency limit looks again this late
TURN_TTL_MS = 3_600_000  # a booked turn outlives its time this long (a worker down meanwhile)

_ACQUIRE = LuaScript("jobs.scrape", "politeness_acquire")


@dataclass(frozen=True)
class SlotLimits:
    """One key's limits: at most `concurrency` requests at once (0: no limit), their starts
    `min_delay` seconds apart; `timeout` is the longest a request takes (a crashed holder's
    lease lapses 5 s later) and the longest a request that cannot be postponed waits in place."""

    concurrency: int
    min_delay: float
    timeout: float

    @classmethod
    def scraping(cls, settings: Settings) -> SlotLimits:
        """Every host's, for the scraper (SCRAPE_PER_HOST_CONCURRENCY, SCRAPE_MIN_HOST_DELAY)."""
        return cls(
            settings.scrape_per_host_concurrency,
            settings.scrape_min_host_delay,
            settings.scrape_timeout,
        )


@dataclass
class HostWait:
    """How long a request waited for its host: in all (since its turn was first booked, across
    postponements) and in place (in this run, holding the worker slot)."""

    queued_s: float = 0.0
    in_place_s: float = 0.0


class Politeness:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings

    @contextlib.asynccontextmanager
    async def slot(
        self,
        host: str,
        waiter: str | None = None,
        *,
        key: str | None = None,
        limits: SlotLimits | None = None,
    ) -> AsyncIterator[HostWait]:
        """Hold one of the host's request slots. With a `waiter` (the job's id), book a turn and
        raise `Postpone` when it is not soon; without, wait in place (up to the page timeout).
        Another `key` (Redis key prefix) and `limits` than the scraper's: HTTP jobs' targets."""
        s = limits or SlotLimits.scraping(self._settings)
        key = key or f"{HOST_KEY_PREFIX}{host}"
        token = uuid.uuid4().hex
        ask = SlotAsk(
            key=key,
            token=token,
            turn_owner=waiter or token,
            limit=s.concurrency or 1_000_000_000,  # 0: no limit, only the delay
            # A crashed holder's lease lapses after the longest a request may take.
            lease_ms=int((s.timeout + 5) * 1000),
            delay_ms=int(s.min_delay * 1000),
            mode="turn" if waiter else "now",
        )
        loop = asyncio.get_running_loop()
        began = waited_until = loop.time()
        deadline = began + (WAIT_IN_PLACE_S if waiter else s.timeout)
        while True:
            in_place_ms = max(0, int((deadline - loop.time()) * 1000))
            wait_ms, queued_ms, postpone = await ask.run(self._redis, in_place_ms)
            if wait_ms == 0:
                break
            if postpone:
                raise Postpone(wait_ms / 1000 - WAKE_EARLY_S, f"waiting for its turn at {host}")
            if loop.time() >= deadline:
                raise TransientJobError(f"host {host} stayed busy for {s.timeout:g}s")
            await asyncio.sleep(min(wait_ms / 1000, MAX_WAIT_STEP_S))
            waited_until = loop.time()
        in_place = waited_until - began  # 0 when the first ask got the slot
        try:
            yield HostWait(queued_s=max(queued_ms / 1000, in_place), in_place_s=in_place)
        finally:
            await asyncio.shield(self._redis.zrem(f"{key}:leases", token))


@dataclass(frozen=True)
class SlotAsk:
    """A request's asks for one of the slots of `key` (a host's key prefix), by `token`, for
    the turn of `turn_owner` (a job's id, or the token): lua/politeness_acquire.lua."""

    key: str
    token: str
    turn_owner: str
    limit: int  # requests at once
    lease_ms: int
    delay_ms: int  # between two starts
    mode: Literal["turn", "now"]  # book a turn, or start as soon as the host allows

    async def run(self, redis: Redis, in_place_ms: int) -> tuple[int, int, int]:
        """(wait_ms, queued_ms, postpone): wait 0, the slot is taken; else wait in place or
        postpone by wait_ms. `in_place_ms`: how long the caller may still wait in place."""
        k = self.key
        keys = [f"{k}:leases", f"{k}:next", f"{k}:tail", f"{k}:turn:{self.turn_owner}"]
        args: list[str | int] = [
            self.token, self.limit, self.lease_ms, self.delay_ms, self.mode, in_place_ms,
            TURN_TTL_MS, BUSY_RETRY_MS,
        ]  # fmt: skip
        wait_ms, queued_ms, postpone = await _ACQUIRE.run(redis, keys, args)
        return int(wait_ms), int(queued_ms), int(postpone)
