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

from redis.asyncio import Redis

from asyncjobs.errors import Postpone, TransientJobError
from asyncjobs.keys import HOST_KEY_PREFIX
from asyncjobs.settings import Settings

MAX_WAIT_STEP_S = 0.5
# A job waits in place for at most this long (a claim is ~poll_delay late anyway); longer and it
# gives its slot back. It is claimed again this much before its turn, to be on time.
WAIT_IN_PLACE_S = 0.5
WAKE_EARLY_S = 0.1
BUSY_RETRY_MS = 500  # a job due while the host is at its concurrency limit looks again this late
TURN_TTL_MS = 3_600_000  # a booked turn outlives its time this long (a worker down meanwhile)

# KEYS: leases (zset token -> lease end), gate (earliest next start), tail (earliest time a new
# turn can be booked), turn (this waiter's "start:first booked", ms).
# ARGV: token, limit, lease_ms, delay_ms, mode ("turn": book a turn, start when it is due;
# "now": start as soon as the host allows), ms the caller may still wait in place, turn ttl ms,
# busy retry ms.
# Returns {wait_ms, queued_ms, postpone}: wait 0 means the slot is taken (queued_ms since the
# turn was first booked); else wait wait_ms in place (postpone 0) or postpone the job by wait_ms.
ACQUIRE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit, lease, delay = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local in_place, ttl, busy = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local gate = tonumber(redis.call('GET', KEYS[2]) or '0')
local first = now
local function book(earliest)
  local start = math.max(earliest, gate, tonumber(redis.call('GET', KEYS[3]) or '0'))
  redis.call('SET', KEYS[3], start + delay, 'PX', start + delay - now + ttl)
  redis.call('SET', KEYS[4], start .. ':' .. first, 'PX', start - now + ttl)
  return start
end
if ARGV[5] == 'turn' then
  local turn = redis.call('GET', KEYS[4])
  local start
  if turn then
    local sep = string.find(turn, ':', 1, true)
    start, first = tonumber(string.sub(turn, 1, sep - 1)), tonumber(string.sub(turn, sep + 1))
  else
    start = book(now)
  end
  if start > now then
    return {start - now, 0, start - now > in_place and 1 or 0}
  end
end
local wait = gate - now
if redis.call('ZCARD', KEYS[1]) >= limit then wait = math.max(wait, 25) end
if wait <= 0 then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], lease)
  if delay > 0 then redis.call('SET', KEYS[2], now + delay, 'PX', delay + 1000) end
  redis.call('DEL', KEYS[4])
  return {0, now - first, 0}
end
if ARGV[5] ~= 'turn' or wait <= in_place then return {wait, 0, 0} end
-- Due, but the host will not be free soon (slow pages at the concurrency limit, or requests
-- that went ahead): a new turn at the back of the line, keeping when this one was first booked.
return {book(now + math.max(wait, busy)) - now, 0, 1}
"""


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
        self._acquire = redis.register_script(ACQUIRE_SCRIPT)

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
        turn_key = f"{key}:turn:{waiter or token}"
        # A crashed holder's lease lapses after the longest a request may take.
        lease_ms = int((s.timeout + 5) * 1000)
        limit = s.concurrency or 1_000_000_000  # 0: no limit, only the delay
        delay_ms = int(s.min_delay * 1000)
        mode = "turn" if waiter else "now"
        loop = asyncio.get_running_loop()
        began = waited_until = loop.time()
        deadline = began + (WAIT_IN_PLACE_S if waiter else s.timeout)
        while True:
            in_place_ms = max(0, int((deadline - loop.time()) * 1000))
            args: list[str | int] = [
                token, limit, lease_ms, delay_ms, mode, in_place_ms, TURN_TTL_MS, BUSY_RETRY_MS
            ]  # fmt: skip
            keys = [f"{key}:leases", f"{key}:next", f"{key}:tail", turn_key]
            wait_ms, queued_ms, postpone = map(int, await self._acquire(keys=keys, args=args))
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
