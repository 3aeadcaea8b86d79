"""Sources: URLs scraped on a schedule. Stored in Redis, one JSON document per source.

Keys: `asyncjobs:source:<id>` (JSON), `asyncjobs:sources` (set of ids),
`asyncjobs:source:<id>:failures` (hash: failure reason -> count, jobs.scrape.errors), its runs
(jobs.scrape.runs).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from croniter import croniter
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from redis.asyncio import Redis

from asyncjobs.keys import SOURCE_KEY_PREFIX, SOURCES_KEY, source_failures_key
from jobs.scrape.page import MAX_URL_LENGTH
from jobs.scrape.runs import delete_runs
from jobs.scrape.selectors import Selectors, SelectorSpec
from jobs.values import as_text, now_utc

SCHEDULE_ALIASES = {"hourly": "0 * * * *", "daily": "0 0 * * *"}
MAX_PAGES_PER_RUN = 500


def cron_expression(schedule: str) -> str:
    return SCHEDULE_ALIASES.get(schedule, schedule)


def check_schedule(schedule: str) -> str:
    expression = cron_expression(schedule.strip())
    if len(expression.split()) != 5 or not croniter.is_valid(expression):
        raise ValueError(
            f"{schedule!r} is not 'hourly', 'daily' or a 5-field cron expression "
            "(minute hour day-of-month month day-of-week)"
        )
    return schedule.strip()


class SourceFields(BaseModel):
    """What a caller sets; every field optional so a PATCH can reuse it."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200)
    url: AnyHttpUrl | None = Field(None, max_length=MAX_URL_LENGTH)
    schedule: str | None = Field(None, max_length=100)
    selectors: Selectors | None = None
    follow_links: int | None = Field(None, ge=0, le=2, description="link depth to follow")
    max_pages: int | None = Field(None, ge=1, le=MAX_PAGES_PER_RUN, description="pages per run")
    force: bool | None = Field(None, description="every run fetches its pages unconditionally")

    @field_validator("schedule")
    @classmethod
    def _schedule_ok(cls, schedule: str | None) -> str | None:
        return None if schedule is None else check_schedule(schedule)

    @field_validator("max_pages")
    @classmethod
    def _within_the_runs_cap(cls, max_pages: int | None, info: ValidationInfo) -> int | None:
        """Runs stop at SOURCE_MAX_PAGES (validation context `max_pages`): asking for more
        is refused rather than accepted and quietly cut."""
        cap = (info.context or {}).get("max_pages")
        if max_pages is not None and cap is not None and max_pages > cap:
            raise ValueError(f"at most {cap} pages per run (SOURCE_MAX_PAGES)")
        return max_pages


class SourceSpec(SourceFields):
    """`POST /sources`: url and schedule are required."""

    url: AnyHttpUrl = Field(max_length=MAX_URL_LENGTH)
    schedule: str = Field(max_length=100)


class Source(BaseModel):
    id: str
    name: str | None = None
    url: str
    schedule: str
    selectors: dict[str, SelectorSpec] = {}
    follow_links: int = 0
    max_pages: int = 20
    force: bool = False
    created_at: datetime
    updated_at: datetime


def period_start(schedule: str, now: datetime) -> datetime:
    """The latest time the schedule fired at or before `now`: one scrape per such period."""
    start: datetime = croniter(cron_expression(schedule), now + timedelta(seconds=1)).get_prev(
        datetime
    )
    return start


def period_length(schedule: str, start: datetime) -> timedelta:
    end: datetime = croniter(cron_expression(schedule), start).get_next(datetime)
    return end - start


async def create_source(redis: Redis, spec: SourceSpec) -> Source:
    now = now_utc()
    data = spec.model_dump(mode="json", exclude_none=True)
    extra = {"id": uuid.uuid4().hex, "created_at": now, "updated_at": now}
    source = Source.model_validate(data | extra)
    await save_source(redis, source)
    return source


async def save_source(redis: Redis, source: Source) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(SOURCE_KEY_PREFIX + source.id, source.model_dump_json())
        pipe.sadd(SOURCES_KEY, source.id)
        await pipe.execute()


async def get_source(redis: Redis, source_id: str) -> Source | None:
    raw = await redis.get(SOURCE_KEY_PREFIX + source_id)
    return Source.model_validate_json(raw) if raw else None


async def list_sources(redis: Redis) -> list[Source]:
    ids = sorted(as_text(i) for i in await redis.smembers(SOURCES_KEY))  # type: ignore[misc]
    if not ids:
        return []
    raws = await redis.mget([SOURCE_KEY_PREFIX + i for i in ids])
    return [Source.model_validate_json(raw) for raw in raws if raw]


async def update_source(redis: Redis, source: Source, changes: SourceFields) -> Source:
    data: dict[str, Any] = changes.model_dump(mode="json", exclude_unset=True, exclude_none=True)
    updated = source.model_copy(update=data | {"updated_at": now_utc()})
    updated = Source.model_validate(updated.model_dump())
    await save_source(redis, updated)
    return updated


async def delete_source(redis: Redis, source_id: str) -> bool:
    """The source goes; its documents stay until the daily cleanup removes them as orphans."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(SOURCE_KEY_PREFIX + source_id)
        pipe.srem(SOURCES_KEY, source_id)
        pipe.delete(source_failures_key(source_id))
        deleted, _, _ = await pipe.execute()
    await delete_runs(redis, source_id)
    return bool(deleted)
