"""SMTP_MAX_PER_SECOND: one sending rate for every worker, kept in Redis, that delays messages
instead of failing them (providers refuse mail sent faster than they allow).

Each message takes the next free slot, `1 / rate` seconds after the previous one, from a script
that reads Redis's own clock, so workers on several hosts share one schedule whatever their
clocks say. A message whose slot is near waits for it; one whose slot is further away than
MAX_WAIT_S takes none and is put back in the queue until about then, so a long backlog does
not hold worker slots.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from asyncjobs.errors import TransientJobError
from asyncjobs.keys import SMTP_NEXT_SLOT_KEY
from asyncjobs.luascript import LuaScript

MAX_WAIT_S = 10.0

_TAKE_SLOT = LuaScript("jobs.mail", "sendrate_take_slot")


class RateLimitDeferred(TransientJobError):
    """The message's turn is more than MAX_WAIT_S away: it waits in the queue, not in a worker,
    and is tried again when its turn is near (not after the family's backoff)."""

    backoff = False


class SendRate:
    """At most `per_second` messages a second across every worker using this Redis."""

    def __init__(self, redis: Redis, per_second: float) -> None:
        self._interval_us = round(1_000_000 / per_second)
        self._redis = redis

    async def wait_for_slot(self) -> None:
        wait_us = await take_slot(self._redis, self._interval_us, round(MAX_WAIT_S * 1e6))
        if wait_us < 0:
            seconds = -wait_us / 1e6
            raise RateLimitDeferred(
                f"SMTP_MAX_PER_SECOND: the next sending slot is {seconds:.1f} s away",
                retry_after=seconds,
            )
        if wait_us:
            await asyncio.sleep(wait_us / 1e6)


async def take_slot(redis: Redis, interval_us: int, max_wait_us: int) -> int:
    """Take the next sending slot, `interval_us` after the previous one; the wait for it in us,
    or -(the wait) when it is more than `max_wait_us` away (then none is taken)."""
    return int(await _TAKE_SLOT.run(redis, [SMTP_NEXT_SLOT_KEY], [interval_us, max_wait_us]))
