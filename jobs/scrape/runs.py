"""A source's runs: each scheduled or manual crawl of it, with what it came to (pages changed,
unchanged, not modified, failed) once its last page job has ended. The last SOURCE_RUNS_KEPT
runs are kept.

A run's id is its period: the schedule's start time in seconds for a scheduled run, the start
time in milliseconds for a manual one (so the two never share an id, nor their job ids).
Every page job of a run is pending from just before it is enqueued until it ends for good
(complete, skipped or dead-lettered): the run is finished when none is pending. A page job
that ends otherwise (aborted) is found gone from the queue by `settle_runs`.
"""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any, Literal

from arq.connections import ArqRedis
from pydantic import BaseModel
from redis.asyncio import Redis

from asyncjobs.arqcompat import job_key_prefix
from asyncjobs.keys import (
    source_active_runs_key,
    source_run_info_key,
    source_run_pages_key,
    source_run_pending_key,
    source_runs_key,
)
from asyncjobs.luascript import LuaScript
from asyncjobs.settings import Settings
from jobs.enqueue import enqueue_registered
from jobs.scrape.documents import document_id
from jobs.values import as_text, now_utc

SOURCE_RUNS_KEPT = 20
RUN_TTL_S = 30 * 24 * 3600  # a run's records outlive any run; trimming removes them sooner
# A page's pending entry is written just before its job is enqueued: one younger than this
# may not be in the queue yet, so `settle_runs` does not judge it.
SETTLE_GRACE_MS = 5000

Trigger = Literal["schedule", "manual"]
FAILED = "failed:"  # + reason: an outcome


class RunInProgress(Exception):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id} of this source is in progress")
        self.run_id = run_id


class SourceRun(BaseModel):
    """One run of a source and what it came to so far."""

    run_id: str
    trigger: Trigger
    force: bool
    status: Literal["running", "finished"]
    started_at: datetime
    finished_at: datetime | None = None
    job_id: str  # the start page's job
    pages: int  # page jobs of the run: the start page and the links it followed
    fetched: int  # pages the server answered: changed + unchanged
    changed: int  # a new version
    unchanged: int  # the same text, or a 304
    not_modified: int  # of the unchanged, those answered 304 to a conditional request
    failed: int  # failed for good (after their retries)
    pending: int  # not finished yet
    aborted: int  # ended without an outcome (aborted, or the source deleted meanwhile)
    failures: dict[str, int]  # failed pages by reason


def source_job_id(source_id: str, period: int, url: str | None = None) -> str:
    suffix = f":{document_id(url)}" if url else ""
    return f"source:{source_id}:{period}{suffix}"


def _keys(source_id: str, period: int) -> list[str]:
    return [
        source_run_info_key(source_id, period),
        source_run_pending_key(source_id, period),
        source_run_pages_key(source_id, period),
        source_active_runs_key(source_id),
        source_runs_key(source_id),
    ]


_START = LuaScript("jobs.scrape", "runs_start")
_ADD_PENDING = LuaScript("jobs.scrape", "runs_add_pending")
_FINISH = LuaScript("jobs.scrape", "runs_finish")


async def start_run(
    redis: Redis,
    source_id: str,
    period: int,
    trigger: Trigger,
    *,
    force: bool = False,
    exclusive: bool = False,
) -> str:
    """Record a run before its first job is enqueued; its id. Starting the same run again is
    a no-op (workers ticking at once). `exclusive`: RunInProgress while another run is."""
    code, run_id = await _start(redis, source_id, period, trigger, force, exclusive)
    if code < 0:
        raise RunInProgress(run_id)
    if code > 0:
        await _trim(redis, source_id)
    return run_id


async def _start(
    redis: Redis, source_id: str, period: int, trigger: Trigger, force: bool, exclusive: bool
) -> tuple[int, str]:
    """lua/runs_start.lua: (1, run id) started, (0, run id) started already, (-1, the active
    run's id) refused."""
    info, pending, _pages, active, runs = _keys(source_id, period)
    started = now_utc()
    args: list[str | int] = [
        str(period), trigger, started.isoformat(), int(started.timestamp() * 1000),
        source_job_id(source_id, period), int(force), int(exclusive), RUN_TTL_S,
    ]  # fmt: skip
    code, run_id = await _START.run(redis, [info, pending, active, runs], args)
    return int(code), as_text(run_id)


async def _trim(redis: Redis, source_id: str) -> None:
    """Past SOURCE_RUNS_KEPT runs, the oldest go with their records."""
    key = source_runs_key(source_id)
    old = await redis.lrange(key, SOURCE_RUNS_KEPT, -1)  # type: ignore[misc]
    if not old:
        return
    async with redis.pipeline(transaction=True) as pipe:
        pipe.ltrim(key, 0, SOURCE_RUNS_KEPT - 1)
        for run_id in old:
            pipe.delete(*_keys(source_id, int(run_id))[:3])
            pipe.zrem(source_active_runs_key(source_id), run_id)
        await pipe.execute()


async def add_pending(redis: Redis, source_id: str, period: int, job_id: str) -> None:
    """A page job of the run is about to be enqueued (before: it may end at once)."""
    keys = _keys(source_id, period)[:3]  # info, pending, pages
    await _ADD_PENDING.run(redis, keys, [job_id, int(time.time() * 1000)])


async def finish_page(redis: Redis, source_id: str, period: int, job_id: str, outcome: str) -> None:
    """A page job of the run ended for good with `outcome`; the run ends with its last."""
    keys = _keys(source_id, period)[:4]  # info, pending, pages, active runs
    args: list[str | int] = [job_id, outcome, now_utc().isoformat(), str(period), RUN_TTL_S]
    await _FINISH.run(redis, keys, args)


def page_outcome(result: dict[str, Any]) -> str:
    if result.get("status") == 304:
        return "not_modified"
    return "changed" if result.get("changed") else "unchanged"


async def settle_runs(redis: Redis, source_id: str) -> None:
    """End the pages of active runs whose jobs left the queue without saying so (aborted,
    or lost with their records), and the runs they leave with nothing pending."""
    active = [int(r) for r in await redis.zrange(source_active_runs_key(source_id), 0, -1)]
    cutoff = time.time() * 1000 - SETTLE_GRACE_MS
    for period in active:
        if not await redis.exists(source_run_info_key(source_id, period)):
            await redis.zrem(source_active_runs_key(source_id), str(period))
            continue
        pending = await redis.zrangebyscore(
            source_run_pending_key(source_id, period), "-inf", cutoff
        )
        for job_id in await _gone(redis, [as_text(j) for j in pending]):
            await finish_page(redis, source_id, period, job_id, "aborted")
        await finish_page(redis, source_id, period, "", "")  # none pending: the run ended


async def _gone(redis: Redis, job_ids: list[str]) -> list[str]:
    """The jobs no longer queued, deferred or running (arq keeps a job's key until it ends)."""
    if not job_ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.exists(job_key_prefix + job_id)
        exists = await pipe.execute()
    return [job_id for job_id, there in zip(job_ids, exists, strict=True) if not there]


async def load_runs(redis: Redis, source_id: str) -> list[SourceRun]:
    """The kept runs, newest first, each with its counts (settled first)."""
    await settle_runs(redis, source_id)
    run_ids = [as_text(r) for r in await redis.lrange(source_runs_key(source_id), 0, -1)]  # type: ignore[misc]
    async with redis.pipeline(transaction=False) as pipe:
        for run_id in run_ids:
            pipe.hgetall(source_run_info_key(source_id, int(run_id)))
            pipe.hvals(source_run_pages_key(source_id, int(run_id)))
            pipe.zcard(source_run_pending_key(source_id, int(run_id)))
        replies = await pipe.execute()
    runs = []
    for n, run_id in enumerate(run_ids):
        info, outcomes, pending = replies[3 * n : 3 * n + 3]
        if info:
            runs.append(_summary(run_id, info, [as_text(o) for o in outcomes], int(pending)))
    return runs


def _summary(run_id: str, raw: dict[Any, Any], outcomes: list[str], pending: int) -> SourceRun:
    info = {as_text(k): as_text(v) for k, v in raw.items()}
    counts = Counter(o if not o.startswith(FAILED) else FAILED for o in outcomes)
    failures = Counter(o.removeprefix(FAILED) for o in outcomes if o.startswith(FAILED))
    unchanged = counts["unchanged"] + counts["not_modified"]
    finished = info.get("finished_at")
    return SourceRun(
        run_id=run_id,
        trigger="manual" if info.get("trigger") == "manual" else "schedule",
        force=info.get("force") == "1",
        status="finished" if finished else "running",
        started_at=datetime.fromisoformat(info["started_at"]).astimezone(UTC),
        finished_at=datetime.fromisoformat(finished) if finished else None,
        job_id=info.get("job_id", ""),
        pages=len(outcomes) + pending,
        fetched=counts["changed"] + unchanged,
        changed=counts["changed"],
        unchanged=unchanged,
        not_modified=counts["not_modified"],
        failed=counts[FAILED],
        pending=pending,
        aborted=counts["aborted"] + counts["skipped"],
        failures=dict(sorted(failures.items())),
    )


async def run_now(
    redis: ArqRedis, settings: Settings, source_id: str, force: bool, owner: str | None = None
) -> tuple[str, str]:
    """Start a manual run of the source (RunInProgress while one runs); (run id, job id)."""
    await settle_runs(redis, source_id)
    period = int(time.time() * 1000)
    run_id = await start_run(redis, source_id, period, "manual", force=force, exclusive=True)
    job_id = source_job_id(source_id, int(run_id))
    arguments: dict[str, Any] = {"source_id": source_id, "period": int(run_id)}
    if force:
        arguments["force"] = True
    await enqueue_registered(
        redis, settings, "scrape_source", arguments, job_id=job_id, owner=owner
    )  # None: the same run, started in the same millisecond by another request
    return run_id, job_id


async def delete_runs(redis: Redis, source_id: str) -> None:
    """A deleted source's runs and their records."""
    run_ids = await redis.lrange(source_runs_key(source_id), 0, -1)  # type: ignore[misc]
    keys = [k for r in run_ids for k in _keys(source_id, int(r))[:3]]
    await redis.delete(*keys, source_active_runs_key(source_id), source_runs_key(source_id))
