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
from typing import Any, Literal

from redis.asyncio import Redis

from asyncjobs.keys import QUOTA_KEY_PREFIX, RATE_KEY_PREFIX
from asyncjobs.luascript import LuaScript
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


_TAKE = LuaScript("asyncjobs", "quota_take")

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
        marker, marker_ms = (once[0], max(1000, math.ceil(once[1] * 1000))) if once else (None, 0)
        taken, wait = await self._take(redis, owner, n, marker, marker_ms)
        if not taken:
            raise QuotaExceeded(
                f"{what} needs {n} {self.unit}; this API key's quota of {self.per_hour} "
                f"{self.unit} per hour has room for them in {math.ceil(wait)} s",
                retry_after=wait,
            )

    async def _take(
        self, redis: Redis, owner: str, n: int, marker: str | None, marker_ms: int
    ) -> tuple[bool, float]:
        """lua/quota_take.lua: (True, tokens left) or (False, seconds until `n` are there)."""
        keys = [f"{QUOTA_KEY_PREFIX}{self.unit}:{owner}"]
        if marker is not None:
            keys.append(marker)
        args: list[float] = [self.per_hour, HOUR_S, n, marker_ms]
        taken, value = await _TAKE.run(redis, keys, args)
        return bool(int(taken)), float(value)


def message_quota(settings: Settings) -> HourlyQuota:
    return HourlyQuota("messages", settings.mail_messages_per_hour)


_HELD = LuaScript("asyncjobs", "quota_held")


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
        answer = await self._run(redis, owner, "hold", item, n=n, life_ms=_ms(life))
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
        return int(await self._run(redis, owner, "release", item))

    async def extend(self, redis: Redis, owner: str, item: str, life: float) -> bool:
        """Count `item` for at least `life` seconds from now; whether it is held."""
        return bool(int(await self._run(redis, owner, "extend", item, life_ms=_ms(life))))

    async def held(self, redis: Redis, owner: str) -> int:
        """The bytes `owner` holds now (expired items not counted)."""
        return int(await self._run(redis, owner, "total"))

    async def _run(
        self,
        redis: Redis,
        owner: str,
        op: Literal["hold", "release", "extend", "total"],
        item: str = "",
        *,
        n: int = 0,
        life_ms: int = 0,
    ) -> Any:
        """lua/quota_held.lua: `op` on `owner`'s `item` (`n` bytes, for `life_ms`); its answer."""
        return await _HELD.run(redis, self._keys(owner), [op, item, n, life_ms, self.limit])


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def upload_quota(settings: Settings) -> HeldBytes:
    """The bytes one API key's uploads (image jobs waiting for a worker) hold in Redis."""
    return HeldBytes("upload-bytes", settings.upload_max_bytes_per_key, "UPLOAD_MAX_BYTES_PER_KEY")
