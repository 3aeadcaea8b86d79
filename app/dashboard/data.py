"""What the dashboard shows, read from Redis: arq's own keys, the operator keys the worker's
monitor writes (jobs/engine/monitor.py) and the stores of dead letters, sources and documents."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from arq.connections import ArqRedis
from arq.jobs import DeserializationError, JobDef, deserialize_job, deserialize_result
from redis.asyncio import Redis

from app.redaction import redact
from asyncjobs.arqcompat import job_key_prefix, result_key_prefix
from asyncjobs.jobstate import JobState
from asyncjobs.keys import (
    CRON_KEY_PREFIX,
    MINUTE_KEY_PREFIX,
    RUNNING_KEY,
    WORKER_KEY_PREFIX,
    WORKERS_KEY,
    source_docs_key,
    source_failures_key,
    waiting_key,
)
from asyncjobs.settings import Settings
from jobs.engine.dependencies import drop_expired_waiting
from jobs.engine.queue import waiting_counts
from jobs.scrape.sources import Source, list_sources
from jobs.values import as_text
from jobs.worker import cron_jobs

# The states a listed job can be in (a job not found is not listed), in the filter's order.
JOB_STATES = tuple(state for state in JobState if state != JobState.NOT_FOUND)
WINDOWS = {"15m": timedelta(minutes=15), "1h": timedelta(hours=1), "24h": timedelta(days=1)}
# (the jobs list, its search and its pages: app/dashboard/joblist.py)
CHART_MINUTES = 60


def _texts(fields: Mapping[bytes, bytes]) -> dict[str, str]:
    return {as_text(k): as_text(v) for k, v in fields.items()}


def _seconds(value: str | None) -> datetime | None:
    return datetime.fromtimestamp(float(value), UTC) if value else None


# -- overview --


@dataclass(frozen=True)
class MinuteCount:
    start: datetime
    completed: int
    failed: int


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    host: str
    pid: str
    running: int
    running_jobs: list[str]
    completed: int
    started_at: datetime | None
    last_seen: datetime | None


@dataclass(frozen=True)
class Overview:
    queued: int
    deferred: int
    in_progress: int
    waiting: int  # for other jobs to end (`after`, `then`, a batch's callback)
    minutes: list[MinuteCount]  # oldest first, the current minute last
    workers: list[WorkerInfo]
    redis_memory: str

    @property
    def completed_last_hour(self) -> int:
        return sum(m.completed for m in self.minutes)

    @property
    def failed_last_hour(self) -> int:
        return sum(m.failed for m in self.minutes)


async def read_overview(redis: ArqRedis, queue_name: str) -> Overview:
    now = time.time()
    now_ms = int(now * 1000)
    minutes = range(int(now // 60) - CHART_MINUTES + 1, int(now // 60) + 1)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcount(queue_name, "-inf", now_ms)
        pipe.zcount(queue_name, f"({now_ms}", "+inf")
        pipe.zcard(RUNNING_KEY)
        drop_expired_waiting(pipe, queue_name)
        pipe.zcard(waiting_key(queue_name))
        pipe.smembers(WORKERS_KEY)
        for minute in minutes:
            pipe.hgetall(f"{MINUTE_KEY_PREFIX}{minute}")
        due, deferred, running, _, waiting, worker_ids, *per_minute = await pipe.execute()
    counts = [
        MinuteCount(
            start=datetime.fromtimestamp(minute * 60, UTC),
            completed=int(fields.get(b"completed", 0)),
            failed=int(fields.get(b"failed", 0)),
        )
        for minute, fields in zip(minutes, per_minute, strict=True)
    ]
    memory = await redis.info("memory")
    queued, deferred = waiting_counts(due, deferred, running)
    return Overview(
        queued=queued,
        deferred=deferred,
        in_progress=running,
        waiting=waiting,
        minutes=counts,
        workers=await read_workers(redis, sorted(as_text(i) for i in worker_ids)),
        redis_memory=str(memory.get("used_memory_human", "?")),
    )


async def read_workers(redis: Redis, worker_ids: list[str]) -> list[WorkerInfo]:
    """Workers whose registry hash is still there: each refreshes its own every second, with a
    short TTL, so a killed worker drops out by itself (its id may linger in the set)."""
    async with redis.pipeline(transaction=False) as pipe:
        for worker_id in worker_ids:
            pipe.hgetall(WORKER_KEY_PREFIX + worker_id)
        records = await pipe.execute()
    workers = []
    for worker_id, raw in zip(worker_ids, records, strict=True):
        if not raw:
            continue
        fields = _texts(raw)
        workers.append(
            WorkerInfo(
                id=worker_id,
                host=fields.get("host", "?"),
                pid=fields.get("pid", "?"),
                running=int(fields.get("running", 0)),
                running_jobs=json.loads(fields.get("running_jobs", "[]")),
                completed=int(fields.get("completed", 0)),
                started_at=_seconds(fields.get("started_at")),
                last_seen=_seconds(fields.get("last_seen")),
            )
        )
    return workers


# -- jobs --


async def read_arguments(redis: Redis, job_id: str) -> dict[str, Any] | None:
    """The job's arguments, secrets redacted: from the job definition while it is queued or
    running, from its result once finished. None when neither is there (or readable)."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(result_key_prefix + job_id)
        pipe.get(job_key_prefix + job_id)
        raw_result, raw_job = await pipe.execute()
    job: JobDef
    try:
        if raw_result is not None:
            job = deserialize_result(raw_result)
        elif raw_job is not None:
            job = deserialize_job(raw_job)
        else:
            return None
    except DeserializationError:
        return None
    arguments: dict[str, Any] = dict(job.kwargs)
    if job.args:
        arguments["*args"] = list(job.args)
    redacted: dict[str, Any] = redact(arguments)
    return redacted


# -- cron --


@dataclass(frozen=True)
class CronInfo:
    name: str
    schedule: str
    runs: int
    last_run: datetime | None
    last_result: str | None
    next_run: datetime | None


# arq's CronJob fields, coarsest first, with the period each one repeats in when it is set.
CRON_FIELDS = (
    ("month", "year"),
    ("day", "month"),
    ("weekday", "week"),
    ("hour", "day"),
    ("minute", "hour"),
    ("second", "minute"),
)


def describe_schedule(job: Any) -> str:
    """E.g. 'hour 3, minute 0, second 0 of every day (UTC)' for an arq CronJob."""
    parts, period = [], ""
    for field, repeats_every in CRON_FIELDS:
        value = getattr(job, field)
        if value is None:  # any value of this field
            continue
        values = sorted(value) if isinstance(value, set | frozenset) else [value]
        parts.append(f"{field} {', '.join(str(v) for v in values)}")
        period = period or repeats_every
    return f"{', '.join(parts)} of every {period} (UTC)" if parts else "every second"


async def read_cron(redis: Redis, settings: Settings) -> list[CronInfo]:
    jobs = cron_jobs(settings)
    async with redis.pipeline(transaction=False) as pipe:
        for job in jobs:
            pipe.hgetall(CRON_KEY_PREFIX + job.name.removeprefix("cron:"))
        records = await pipe.execute()
    now = datetime.now(UTC)  # the worker runs cron in UTC too (jobs.worker.worker_options)
    rows = []
    for job, raw in zip(jobs, records, strict=True):
        fields = _texts(raw)
        job.calculate_next(now)
        rows.append(
            CronInfo(
                name=job.name,
                schedule=describe_schedule(job),
                runs=int(fields.get("runs", 0)),
                last_run=_seconds(fields.get("last_run")),
                last_result=fields.get("last_result"),
                next_run=job.next_run,
            )
        )
    return rows


# -- sources --


@dataclass(frozen=True)
class SourceInfo:
    source: Source
    documents: int
    failures: dict[str, int]


async def read_sources(redis: Redis) -> list[SourceInfo]:
    sources = await list_sources(redis)
    async with redis.pipeline(transaction=False) as pipe:
        for source in sources:
            pipe.scard(source_docs_key(source.id))
            pipe.hgetall(source_failures_key(source.id))
        replies = await pipe.execute()
    return [
        SourceInfo(
            source=source,
            documents=int(documents),
            failures={reason: int(n) for reason, n in _texts(failures).items()},
        )
        for source, documents, failures in zip(sources, replies[::2], replies[1::2], strict=True)
    ]
