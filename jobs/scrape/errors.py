"""Why a scrape failed, as a type: each error the scraper raises carries its `reason`, so the
counts per source and in the daily report never depend on an error message's wording."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from enum import StrEnum
from typing import Any

from redis.asyncio import Redis

from asyncjobs.errors import PermanentJobError, TransientJobError
from asyncjobs.keys import SCRAPE_FAILURES_KEY, source_failures_key
from jobs.cpulimit import CpuLimitExceeded


class FailureReason(StrEnum):
    DNS = "dns"  # the name does not resolve
    CONNECT = "connect"  # refused, reset, unreachable
    TIMEOUT = "timeout"  # the request, or the whole job, ran out of time
    NETWORK = "network"  # the connection broke mid-answer (disconnect, bad framing)
    HTTP_4XX = "http_4xx"
    HTTP_5XX = "http_5xx"
    HTTP_OTHER = "http_other"  # a status neither 2xx, 4xx nor 5xx (a 3xx with no Location)
    REDIRECTS = "redirects"  # too many, or to a URL no request can be made to
    TOO_BIG = "too_big"
    BLOCKED_BY_GUARD = "blocked_by_guard"  # SSRF guard: private address, port, scheme
    ROBOTS = "robots"
    NOT_HTML = "not_html"
    SELECTOR_LIMIT = "selector_limit"  # selectors past CPU_LIMIT_SECONDS or their size cap
    OTHER = "other"


class ScrapeFailed(PermanentJobError):
    """A scrape that will fail the same way if tried again."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # arq stores a failed job's exception pickled: rebuilt from these, not from `args`
        return type(self), (self.reason, str(self))


class ScrapeUnavailable(TransientJobError):
    """A scrape that may work later (timeouts, refused connections, 5xx, 429)."""

    def __init__(
        self, reason: FailureReason, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.reason, str(self), self.retry_after)


def reason_of(exc: BaseException) -> FailureReason:
    """The typed reason of any exception a scrape job can end with."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, FailureReason):
        return reason
    if isinstance(exc, CpuLimitExceeded):
        return FailureReason.SELECTOR_LIMIT
    # the job's own deadline cancels it (the retry wrapper turns that into a timeout)
    if isinstance(exc, TimeoutError | asyncio.CancelledError):
        return FailureReason.TIMEOUT
    return FailureReason.OTHER


# The reason the running scrape job last failed with, for its dead-letter hook: the hook is
# called in the job's own context (jobs.retry), after the wrapper decided the failure is final.
_LAST_FAILURE: ContextVar[FailureReason | None] = ContextVar("scrape_failure", default=None)


@contextlib.contextmanager
def noting_failure() -> Iterator[None]:
    """Around a scrape job's body: remember why it failed (Postpone is no failure, but a
    postponed job is never dead-lettered, so what it notes is never read)."""
    _LAST_FAILURE.set(None)
    try:
        yield
    except BaseException as exc:
        _LAST_FAILURE.set(reason_of(exc))
        raise


def last_failure() -> FailureReason:
    return _LAST_FAILURE.get() or FailureReason.OTHER


async def count_failure(redis: Redis, source_id: str | None, reason: FailureReason) -> None:
    """One scrape failed for good: counted by reason for its source, or with the scrapes of
    no source (the report's ad-hoc row)."""
    key = source_failures_key(source_id) if source_id else SCRAPE_FAILURES_KEY
    await redis.hincrby(key, reason.value, 1)  # type: ignore[misc]
