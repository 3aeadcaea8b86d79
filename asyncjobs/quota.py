"""What one API key may use, counted in Redis so that every web process and worker agrees.

Two measures with two units, so that neither contradicts the other:
- `Window`: requests per window (a fixed-window counter), charged by the API on arrival;
- `HourlyQuota`: messages per hour (a token bucket that refills continuously), charged where
  a message is asked for: by the API for an email or a newsletter, and by the worker for each
  run of a schedule, to the key that owns it;
- `HeldBytes`: bytes held at once (uploads waiting for their jobs), charged when an item is
  kept and released when it is removed, each item expiring so that one never released (its
  worker crashed) stops counting on its own.

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


# KEYS: the owner's items (zset: item -> expiry, ms of Redis's clock), their sizes (hash: item ->
# bytes), and their total (string). Every script first drops the items that have expired, and
# ends with `keep`: the three keys expire with the last item (so an owner whose items were
# never released is forgotten once they have expired), or go when there is none.
_HELD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local total = tonumber(redis.call('GET', KEYS[3]) or '0')
local function drop(item)
  local size = tonumber(redis.call('HGET', KEYS[2], item) or '0')
  redis.call('HDEL', KEYS[2], item)
  if redis.call('ZREM', KEYS[1], item) == 1 then
    total = total - size
    return size
  end
  return 0
end
local function keep()
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  if #last == 0 then
    redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
    total = 0
  else
    total = math.max(total, 0)
    redis.call('SET', KEYS[3], total)
    local until_ms = tonumber(last[2]) + 1000
    for _, key in ipairs(KEYS) do redis.call('PEXPIREAT', key, until_ms) end
  end
end
for _, item in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do drop(item) end
"""

# ARGV: item, bytes, life (ms), limit. {1, total held} once held; {0, ms until enough of the
# other items have expired for it to fit, total held} when it does not fit now. An item held
# already (a request tried again) is charged again in place of its first charge.
_HOLD = (
    _HELD
    + """
local item, n, life, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local old = 0
if redis.call('ZSCORE', KEYS[1], item) then
  old = tonumber(redis.call('HGET', KEYS[2], item) or '0')
end
local answer
if total - old + n <= limit then
  drop(item)
  redis.call('ZADD', KEYS[1], now + life, item)
  redis.call('HSET', KEYS[2], item, n)
  total = total + n
  keep()
  answer = {1, total}
else
  local need, freed, wait = total - old + n - limit, 0, life
  local held = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  for i = 1, #held, 2 do
    if held[i] ~= item then
      freed = freed + tonumber(redis.call('HGET', KEYS[2], held[i]) or '0')
      if freed >= need then
        wait = tonumber(held[i + 1]) - now
        break
      end
    end
  end
  keep()
  answer = {0, wait, total}
end
return answer
"""
)

# ARGV: item. The bytes released (0: it was not held, or had expired).
_RELEASE = _HELD + "local freed = drop(ARGV[1])\nkeep()\nreturn freed\n"

# ARGV: item, life (ms). The item's expiry moved to at least now + life; 1 if it is held.
_EXTEND = (
    _HELD
    + """
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if expiry and tonumber(expiry) < now + tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
end
keep()
if expiry then return 1 end
return 0
"""
)

_TOTAL = _HELD + "keep()\nreturn total\n"


@dataclass(frozen=True)
class HeldBytes:
    """At most `limit` bytes held at once per owner, counted in Redis (its clock decides
    expiries, so web processes and workers on several hosts agree). Each item is charged with
    a life: released when it is removed, or it stops counting when its life ends."""

    unit: str  # what is held: "upload-bytes"
    limit: int
    setting: str  # the setting `limit` comes from, for messages: "UPLOAD_MAX_BYTES_PER_KEY"

    def _keys(self, owner: str) -> list[str]:
        base = f"{QUOTA_KEY_PREFIX}{self.unit}:{owner}"
        return [base, base + ":sizes", base + ":total"]

    def check_fits(self, n: int, what: str = "this upload") -> None:
        """NeverFits if `n` bytes are more than an owner may hold at all."""
        if n > self.limit:
            raise NeverFits(
                f"{what} is {n} bytes, more than the {self.limit} bytes one API key may hold "
                f"at once ({self.setting})"
            )

    async def hold(
        self, redis: Redis, owner: str, item: str, n: int, life: float, what: str = "this upload"
    ) -> int:
        """Charge `item`'s `n` bytes to `owner` for `life` seconds: NeverFits, QuotaExceeded
        (nothing charged), or the bytes the owner now holds."""
        self.check_fits(n, what)
        answer = await redis.register_script(_HOLD)(
            keys=self._keys(owner), args=[item, n, _ms(life), self.limit]
        )
        if int(answer[0]):
            return int(answer[1])
        wait, held = int(answer[1]) / 1000, int(answer[2])
        raise QuotaExceeded(
            f"{what} is {n} bytes; this API key already holds {held} of its {self.limit} "
            f"bytes ({self.setting}). Room in {max(1, math.ceil(wait))} s at the latest, when "
            "enough of them expire; each is released sooner, as soon as its job ends",
            retry_after=wait,
        )

    async def release(self, redis: Redis, owner: str, item: str) -> int:
        """Stop counting `item`; the bytes released."""
        return int(await redis.register_script(_RELEASE)(keys=self._keys(owner), args=[item]))

    async def extend(self, redis: Redis, owner: str, item: str, life: float) -> bool:
        """Count `item` for at least `life` seconds from now; whether it is held."""
        script = redis.register_script(_EXTEND)
        return bool(int(await script(keys=self._keys(owner), args=[item, _ms(life)])))

    async def held(self, redis: Redis, owner: str) -> int:
        """The bytes `owner` holds now (expired items not counted)."""
        return int(await redis.register_script(_TOTAL)(keys=self._keys(owner), args=[]))


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def upload_quota(settings: Settings) -> HeldBytes:
    """The bytes one API key's uploads (image jobs waiting for a worker) hold in Redis."""
    return HeldBytes("upload-bytes", settings.upload_max_bytes_per_key, "UPLOAD_MAX_BYTES_PER_KEY")
