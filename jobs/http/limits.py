"""Limits per target for HTTP jobs: at most N requests at once and R starts a second against one
host:port, or against the `limit_group` a request names ("billing"), across every worker.

They are the scraper's politeness (jobs/scrape/politeness.py) on keys of their own: one Lua
script in Redis books each request a turn, and a job whose turn is not soon gives its worker slot
back and waits in the queue (`Postpone`: not a try, not a failure). A job's limits are its
request's `concurrency` / `rate_per_second` within HTTP_JOBS_CONCURRENCY /
HTTP_JOBS_RATE_PER_SECOND (which are also the defaults); jobs of one target should ask alike,
since each job is held to its own numbers. With no limit at all, no Redis round trip is made.
"""

from __future__ import annotations

import contextlib

from redis.asyncio import Redis
from yarl import URL

from asyncjobs.keys import HTTP_LIMIT_KEY_PREFIX
from asyncjobs.settings import Settings
from jobs.http.spec import HttpCall
from jobs.scrape.politeness import HostWait, Politeness, SlotLimits


def tightest(asked: float | None, ceiling: float) -> float:
    """A request's own limit within the setting's (0: none), or the setting's."""
    if asked and ceiling:
        return min(asked, ceiling)
    return asked or ceiling


def limits_of(call: HttpCall, settings: Settings, timeout: float) -> SlotLimits | None:
    """The job's limits; None when it has none."""
    concurrency = int(tightest(call.concurrency, settings.http_jobs_concurrency))
    rate = tightest(call.rate_per_second, settings.http_jobs_rate_per_second)
    if not concurrency and not rate:
        return None
    return SlotLimits(concurrency, 1 / rate if rate else 0.0, timeout)


def target_of(call: HttpCall, url: URL) -> tuple[str, str]:
    """(name for messages, Redis key prefix) of what the limits count against."""
    if call.limit_group:
        return call.limit_group, f"{HTTP_LIMIT_KEY_PREFIX}group:{call.limit_group}"
    name = f"{url.host}:{url.port}"
    return name, f"{HTTP_LIMIT_KEY_PREFIX}host:{name}"


def slot(
    redis: Redis,
    settings: Settings,
    call: HttpCall,
    url: URL,
    limits: SlotLimits | None,
    waiter: str | None,
) -> contextlib.AbstractAsyncContextManager[HostWait]:
    """Hold one of the target's slots for a request to `url` (nothing to hold without limits).
    With a `waiter` (the job's id) a turn that is not soon postpones the job."""
    if limits is None:
        return contextlib.nullcontext(HostWait())
    name, key = target_of(call, url)
    return Politeness(redis, settings).slot(name, waiter, key=key, limits=limits)
