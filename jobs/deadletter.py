"""Dead-letter store: jobs that failed for good are kept in Redis with what is needed to rerun them.

One JSON document per entry under `asyncjobs:dead:<job_id>`, indexed by failure time in the
sorted set `asyncjobs:dead` (newest first when listed).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel
from redis.asyncio import Redis

from asyncjobs.keys import DEAD_INDEX_KEY, DEAD_KEY_PREFIX
from asyncjobs.redis import execute_replicated
from asyncjobs.settings import Settings
from jobs.values import as_text


class DeadLetter(BaseModel):
    id: str  # the id of the job that failed
    function: str
    arguments: dict[str, Any]  # the job's keyword arguments
    error: str
    reason: Literal["permanent", "exhausted"]
    tries: int
    enqueue_time: datetime | None
    failed_at: datetime


async def add_dead_letter(
    redis: Redis, entry: DeadLetter, settings: Settings | None = None
) -> None:
    """Keep the entry; with `settings` asking for REDIS_WAIT_REPLICAS, on replicas too
    (NotReplicatedError otherwise: the job is then retried, and dead-lettered again)."""
    waiting = settings is not None and settings.redis_wait_replicas > 0
    async with redis.pipeline(transaction=not waiting) as pipe:  # WAIT cannot go in a MULTI
        pipe.set(DEAD_KEY_PREFIX + entry.id, entry.model_dump_json())
        pipe.zadd(DEAD_INDEX_KEY, {entry.id: entry.failed_at.timestamp()})
        if waiting and settings is not None:
            await execute_replicated(pipe, settings)
        else:
            await pipe.execute()


async def get_dead_letter(redis: Redis, entry_id: str) -> DeadLetter | None:
    raw = await redis.get(DEAD_KEY_PREFIX + entry_id)
    return DeadLetter.model_validate_json(raw) if raw else None


async def list_dead_letters(redis: Redis, offset: int, limit: int) -> tuple[int, list[DeadLetter]]:
    """(total, one page, newest first)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(DEAD_INDEX_KEY)
        pipe.zrevrange(DEAD_INDEX_KEY, offset, offset + limit - 1)
        total, ids = await pipe.execute()
    if not ids:
        return total, []
    raws = await redis.mget([DEAD_KEY_PREFIX + as_text(i) for i in ids])
    return total, [DeadLetter.model_validate_json(raw) for raw in raws if raw]


async def remove_dead_letter(redis: Redis, entry_id: str) -> bool:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(DEAD_KEY_PREFIX + entry_id)
        pipe.zrem(DEAD_INDEX_KEY, entry_id)
        deleted, _ = await pipe.execute()
    return bool(deleted)


# --- bulk (the dashboard's bulk actions) ------------------------------------------------------
SCAN_CHUNK = 500  # entries read per round trip when matching a filter
SCAN_LIMIT = 20_000  # the newest entries a filter looks at, so a page view stays bounded


async def take_dead_letters(redis: Redis, entry_ids: list[str]) -> list[DeadLetter]:
    """Take entries out, in one round trip; the ones this call took. GETDEL is atomic: of two
    concurrent takers (two operators' bulk retries) each entry goes to one only."""
    async with redis.pipeline(transaction=False) as pipe:
        for entry_id in entry_ids:
            pipe.getdel(DEAD_KEY_PREFIX + entry_id)
            pipe.zrem(DEAD_INDEX_KEY, entry_id)
        replies = await pipe.execute()
    return [DeadLetter.model_validate_json(raw) for raw in replies[::2] if raw]


async def add_dead_letters(redis: Redis, entries: list[DeadLetter]) -> None:
    """Put entries back (their retry failed), in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for entry in entries:
            pipe.set(DEAD_KEY_PREFIX + entry.id, entry.model_dump_json())
            pipe.zadd(DEAD_INDEX_KEY, {entry.id: entry.failed_at.timestamp()})
        await pipe.execute()


async def remove_dead_letters(redis: Redis, entry_ids: list[str]) -> int:
    """Delete entries, in one round trip; how many were there (each counted by one caller)."""
    async with redis.pipeline(transaction=False) as pipe:
        for entry_id in entry_ids:
            pipe.delete(DEAD_KEY_PREFIX + entry_id)
            pipe.zrem(DEAD_INDEX_KEY, entry_id)
        replies = await pipe.execute()
    return sum(int(deleted) for deleted in replies[::2])


class DeadLetterFilter(BaseModel):
    function: str = ""  # the job's function, exactly
    error: str = ""  # text the error contains, ignoring case

    def __bool__(self) -> bool:
        return bool(self.function or self.error)

    def matches(self, entry: DeadLetter) -> bool:
        if self.function and entry.function != self.function:
            return False
        return self.error.casefold() in entry.error.casefold()


class DeadLetterMatches(BaseModel):
    matched: int  # among the entries scanned
    entries: list[DeadLetter]  # the first `limit` of them, newest first
    complete: bool  # False: more than SCAN_LIMIT entries, the oldest not looked at


async def find_dead_letters(
    redis: Redis, where: DeadLetterFilter, limit: int, scan_limit: int = SCAN_LIMIT
) -> DeadLetterMatches:
    """The entries matching `where`, newest first: read SCAN_CHUNK at a time (ids, then their
    documents), at most `scan_limit` of them."""
    matched, offset = 0, 0
    entries: list[DeadLetter] = []
    while offset < scan_limit:
        end = min(offset + SCAN_CHUNK, scan_limit) - 1
        ids = await redis.zrevrange(DEAD_INDEX_KEY, offset, end)
        if not ids:
            return DeadLetterMatches(matched=matched, entries=entries, complete=True)
        raws = await redis.mget([DEAD_KEY_PREFIX + as_text(i) for i in ids])
        for raw in raws:  # None: taken since the ids were read
            entry = DeadLetter.model_validate_json(raw) if raw else None
            if entry is not None and where.matches(entry):
                matched += 1
                if len(entries) < limit:
                    entries.append(entry)
        offset += len(ids)
    complete = await redis.zcard(DEAD_INDEX_KEY) <= scan_limit
    return DeadLetterMatches(matched=matched, entries=entries, complete=complete)
