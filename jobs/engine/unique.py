"""Unique jobs: a `unique_key` names the job that holds it, so that a second enqueue with the
same key, while that job is queued, deferred, running or waiting for a retry, answers it
instead of enqueueing another ("sync user 42", asked for by three requests, runs once).

The key is scoped to its owner (the API key id; "-" for none) and to the job type, so one
caller cannot hold another's key, and it holds for a window (`window_s`, default an hour, at
most UNIQUE_WINDOW_MAX) or until its job ends, whichever comes first: after either, the next
enqueue takes it. The check and the take are one step of the enqueue script
(jobs/engine/lua/enqueue.lua), so concurrent enqueues cannot both win.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from redis.asyncio import Redis

from asyncjobs.arqcompat import job_key_prefix
from asyncjobs.keys import unique_key
from asyncjobs.settings import Settings

DEFAULT_WINDOW_S = 3600.0
MAX_KEY_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Unique:
    """An enqueue's unique key (`jobs.engine.queue.enqueue_job`'s `_unique` option)."""

    key: str  # as the caller gave it
    window_s: float  # seconds the key holds at most
    # Whose key it is: None for the job's own owner (its `_owner` option); a follow-up
    # enqueued by a job names the enqueuing job's owner here.
    scope: str | None = None

    @classmethod
    def of(
        cls, key: str, window_s: float | None, settings: Settings, scope: str | None = None
    ) -> Unique:
        """With the default window when none is given (never past UNIQUE_WINDOW_MAX);
        ValueError for a key or window out of bounds."""
        if not 1 <= len(key) <= MAX_KEY_LENGTH:
            raise ValueError(f"unique_key must be 1 to {MAX_KEY_LENGTH} characters")
        limit = settings.unique_window_max
        if window_s is None:
            window_s = min(DEFAULT_WINDOW_S, limit)
        if not 0 < window_s <= limit:
            raise ValueError(f"unique_window_seconds must be above 0 and at most {limit:g}")
        return cls(key, window_s, scope)

    def redis_key(self, job_type: str, owner: str | None = None) -> str:
        """Its Redis key: per scope (this one's, else `owner`) and job type, the key hashed."""
        scope = (self.scope if self.scope is not None else owner) or "-"
        digest = hashlib.sha256(self.key.encode()).hexdigest()[:32]
        return unique_key(scope, job_type, digest)

    @property
    def window_ms(self) -> int:
        return max(1, int(self.window_s * 1000))


class ExistingJob(str):
    """The id an enqueue with a unique key answers when the key's job was already there: a
    `str` (the id) that says it is not a new job (`is_existing`)."""

    __slots__ = ()


def is_existing(job_id: str | None) -> bool:
    """Whether an enqueue's answer is a job that was already there (its unique key's)."""
    return isinstance(job_id, ExistingJob)


async def holder_of(
    redis: Redis, unique: Unique, job_type: str, owner: str | None = None
) -> ExistingJob | None:
    """The job that holds the key now, if it is still queued, deferred, running or waiting for
    a retry. A read ahead of the enqueue (the API's, to spare a charge); the enqueue script
    decides."""
    holder = await redis.get(unique.redis_key(job_type, owner))
    if holder is None:
        return None
    job_id = holder.decode() if isinstance(holder, bytes) else str(holder)
    return ExistingJob(job_id) if await redis.exists(job_key_prefix + job_id) else None
