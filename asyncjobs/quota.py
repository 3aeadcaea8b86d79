"""What one API key may use, counted in Redis so that every web process and worker agrees.

Two measures with two units, so that neither contradicts the other:
- `Window`: requests per window (a fixed-window counter), charged by the API on arrival;
- `HourlyQuota`: messages per hour (a token bucket that refills continuously), charged where
  a message is asked for: by the API for an email or a newsletter, and by the worker for each
  run of a schedule, to the key that owns it.

A charge that can never fit (more than the whole window or bucket) is the caller's to know at
once (the API answers 422); one that fits later says how long to wait (429 with Retry-After).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from redis.asyncio import Redis

from asyncjobs.keys import QUOTA_KEY_PREFIX, RATE_KEY_PREFIX
from asyncjobs.settings import Settings


@dataclass(frozen=True)
class Window:
    """A fixed-window counter in Redis, shared by every web process."""

    name: str  # what is counted, and for whom: "<kind>:<id>"
    seconds: float

    def _key(self, now: float) -> str:
        return f"{RATE_KEY_PREFIX}{self.name}:{int(now // self.seconds)}"

    def retry_after(self, now: float) -> int:
        """Whole seconds until the next window."""
        return max(1, math.ceil((int(now // self.seconds) + 1) * self.seconds - now))

    async def add(self, redis: Redis, now: float, n: int = 1) -> int:
        """Count `n` more; the count in this window."""
        async with redis.pipeline(transaction=True) as pipe:
            pipe.incrby(self._key(now), n)
            pipe.expire(self._key(now), math.ceil(self.seconds) + 1)
            count, _ = await pipe.execute()
        return int(count)

    async def give_back(self, redis: Redis, now: float, n: int = 1) -> None:
        """Count `n` fewer (what `add` counted turned out not to count)."""
        await redis.decrby(self._key(now), n)


# KEYS: the bucket (hash: tokens, at), and optionally a marker that makes the charge once-only.
# ARGV: capacity, seconds to refill from empty, n, the marker's life (ms).
# Takes n tokens if there are n; returns {1, tokens left} or {0, seconds until n are there}.
# With a marker, the first call's answer is kept there and every later call gets it again (a
# schedule's run is charged once however many workers tick). Redis's own clock, so that web
# processes and workers on several hosts share one bucket.
_TAKE = """
if KEYS[2] then
  local done = redis.call('GET', KEYS[2])
  if done then
    local sep = string.find(done, ':', 1, true)
    return {tonumber(string.sub(done, 1, sep - 1)), string.sub(done, sep + 1)}
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local capacity, refill, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local rate = capacity / refill
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - at) * rate)
local answer
if tokens < n then
  answer = {0, tostring((n - tokens) / rate)}
else
  tokens = tokens - n
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate * 1000) + 1000)
  answer = {1, tostring(tokens)}
end
if KEYS[2] then
  redis.call('SET', KEYS[2], answer[1] .. ':' .. answer[2], 'PX', ARGV[4])
end
return answer
"""

HOUR_S = 3600.0


class QuotaExceeded(Exception):
    """Over the quota now; `retry_after` seconds from now the charge fits."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NeverFits(ValueError):
    """A charge larger than the whole quota: waiting does not help."""


@dataclass(frozen=True)
class HourlyQuota:
    """`per_hour` units of `unit` per owner, refilled continuously: a full bucket admits one
    charge of up to `per_hour` at once (the largest newsletter), then `per_hour / 3600` a second."""

    unit: str  # "messages"
    per_hour: int

    def check_fits(self, n: int, what: str = "this request") -> None:
        """NeverFits if `n` is more than the bucket holds."""
        if n > self.per_hour:
            raise NeverFits(
                f"{what} needs {n} {self.unit}, more than the {self.per_hour} {self.unit} per "
                f"hour one API key may use (MAIL_MESSAGES_PER_HOUR)"
            )

    async def take(
        self,
        redis: Redis,
        owner: str,
        n: int,
        what: str = "this request",
        once: tuple[str, float] | None = None,
    ) -> None:
        """Charge `n` to `owner`: NeverFits, QuotaExceeded (nothing charged), or done. `once`:
        a marker key and its life (s); a second call with it repeats the first one's answer."""
        if n <= 0:
            return
        self.check_fits(n, what)
        keys = [f"{QUOTA_KEY_PREFIX}{self.unit}:{owner}"]
        args = [self.per_hour, HOUR_S, n, 0]
        if once is not None:
            keys.append(once[0])
            args[3] = max(1000, math.ceil(once[1] * 1000))
        taken, value = await redis.register_script(_TAKE)(keys=keys, args=args)
        if not int(taken):
            wait = float(value)
            raise QuotaExceeded(
                f"{what} needs {n} {self.unit}; this API key's quota of {self.per_hour} "
                f"{self.unit} per hour has room for them in {math.ceil(wait)} s",
                retry_after=wait,
            )


def message_quota(settings: Settings) -> HourlyQuota:
    return HourlyQuota("messages", settings.mail_messages_per_hour)
