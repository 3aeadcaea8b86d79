"""Per-host politeness shared by every job in every worker: a concurrency limit and a minimum
delay between requests to the same host, both enforced atomically in Redis (one Lua script)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

from redis.asyncio import Redis

from app.settings import Settings
from jobs.errors import TransientJobError

HOST_KEY_PREFIX = "asyncjobs:host:"
MAX_WAIT_STEP_S = 0.5

# KEYS: leases zset, next-allowed-time key. ARGV: token, limit, lease_ms, min_delay_ms.
# Returns 0 when the slot is taken, else milliseconds worth waiting before asking again.
ACQUIRE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 25
end
local next_at = tonumber(redis.call('GET', KEYS[2]) or '0')
if now < next_at then
  return next_at - now
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
local delay = tonumber(ARGV[4])
if delay > 0 then
  redis.call('SET', KEYS[2], now + delay, 'PX', delay + 1000)
end
return 0
"""


class Politeness:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._acquire = redis.register_script(ACQUIRE_SCRIPT)

    @contextlib.asynccontextmanager
    async def slot(self, host: str) -> AsyncIterator[None]:
        """Hold one of the host's request slots; waits (bounded) for a free one."""
        s = self._settings
        leases, next_at = f"{HOST_KEY_PREFIX}{host}:leases", f"{HOST_KEY_PREFIX}{host}:next"
        token = uuid.uuid4().hex
        # A crashed holder's lease lapses after the longest a request may take.
        lease_ms = int((s.scrape_timeout + 5) * 1000)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + s.scrape_timeout
        delay_ms = int(s.scrape_min_host_delay * 1000)
        limit = s.scrape_per_host_concurrency or 1_000_000_000  # 0: no limit, only the delay
        args: list[str | int] = [token, limit, lease_ms, delay_ms]
        while True:
            wait_ms = int(await self._acquire(keys=[leases, next_at], args=args))
            if wait_ms == 0:
                break
            if loop.time() >= deadline:
                raise TransientJobError(f"host {host} stayed busy for {s.scrape_timeout:g}s")
            await asyncio.sleep(min(wait_ms / 1000, MAX_WAIT_STEP_S))
        try:
            yield
        finally:
            await asyncio.shield(self._redis.zrem(leases, token))
