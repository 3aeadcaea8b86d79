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

MAX_WAIT_S = 10.0

# KEYS: the next-slot key. ARGV: interval (us), longest wait (us).
# Returns the wait in us for the slot it took, or -(the wait) if it took none.
_TAKE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval, max_wait = tonumber(ARGV[1]), tonumber(ARGV[2])
local slot = math.max(now, tonumber(redis.call('GET', KEYS[1]) or '0'))
local wait = slot - now
if wait > max_wait then return -wait end
local ttl_ms = math.ceil((wait + interval) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%d', slot + interval), 'PX', ttl_ms)
return wait
"""


class RateLimitDeferred(TransientJobError):
    """The message's turn is more than MAX_WAIT_S away: it waits in the queue, not in a worker,
    and is tried again when its turn is near (not after the family's backoff)."""

    backoff = False


class SendRate:
    """At most `per_second` messages a second across every worker using this Redis."""

    def __init__(self, redis: Redis, per_second: float) -> None:
        self._interval_us = round(1_000_000 / per_second)
        self._script = redis.register_script(_TAKE_SLOT)

    async def wait_for_slot(self) -> None:
        args = [self._interval_us, round(MAX_WAIT_S * 1e6)]
        wait_us = int(await self._script(keys=[SMTP_NEXT_SLOT_KEY], args=args))
        if wait_us < 0:
            seconds = -wait_us / 1e6
            raise RateLimitDeferred(
                f"SMTP_MAX_PER_SECOND: the next sending slot is {seconds:.1f} s away",
                retry_after=seconds,
            )
        if wait_us:
            await asyncio.sleep(wait_us / 1e6)
