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


# KEYS: info, pending, pages, active runs, runs. ARGV: run id, trigger, started_at, start ms,
# job id, force (0/1), exclusive (0/1), TTL s.
# {1, id}: started; {0, id}: that run had started already; {-1, id}: another run is active.
_START = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0, ARGV[1]} end
if ARGV[7] == '1' then
  local active = redis.call('ZRANGE', KEYS[4], 0, 0)
  if #active > 0 then return {-1, active[1]} end
end
redis.call('HSET', KEYS[1], 'trigger', ARGV[2], 'started_at', ARGV[3], 'job_id', ARGV[5],
           'force', ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('LPUSH', KEYS[5], ARGV[1])
for i = 1, 2 do redis.call('EXPIRE', KEYS[i], ARGV[8]) end
return {1, ARGV[1]}
"""

# KEYS: info, pending, pages. ARGV: job id, ms. A job already ended keeps its outcome.
_ADD_PENDING = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

# KEYS: info, pending, pages, active runs. ARGV: job id ("" to only check the end), outcome,
# finished_at, run id, TTL s. A repeated end (a job run again after a crash) changes nothing.
_FINISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' then
  redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2])
  redis.call('EXPIRE', KEYS[3], ARGV[5])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
if redis.call('ZCARD', KEYS[2]) == 0 and redis.call('HEXISTS', KEYS[1], 'finished_at') == 0 then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[3])
  redis.call('ZREM', KEYS[4], ARGV[4])
  return 2
end
return 1
"""


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
    started = now_utc()
    args: list[str | int] = [
        str(period), trigger, started.isoformat(), int(started.timestamp() * 1000),
        source_job_id(source_id, period), int(force), int(exclusive), RUN_TTL_S,
    ]  # fmt: skip
    script = redis.register_script(_START)
    code, run_id = await script(keys=_keys(source_id, period), args=args)
    if int(code) < 0:
        raise RunInProgress(as_text(run_id))
    if int(code) > 0:
        await _trim(redis, source_id)
    return as_text(run_id)


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
    script = redis.register_script(_ADD_PENDING)
    keys = _keys(source_id, period)[:3]
    await script(keys=keys, args=[job_id, int(time.time() * 1000)])


async def finish_page(redis: Redis, source_id: str, period: int, job_id: str, outcome: str) -> None:
    """A page job of the run ended for good with `outcome`; the run ends with its last."""
    script = redis.register_script(_FINISH)
    args: list[str | int] = [job_id, outcome, now_utc().isoformat(), str(period), RUN_TTL_S]
    await script(keys=_keys(source_id, period)[:4], args=args)


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
