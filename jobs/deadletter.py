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
