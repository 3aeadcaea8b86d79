"""What the worker tells operators, kept in Redis so that every web process can show it.

Counters, histograms, running/recent job indexes, per-minute totals and a registry of live
workers. A worker buffers what happens and writes it once a second in one pipeline, so the
bookkeeping costs one round trip per second, not several per job; a killed worker loses at
most its last second of counts, never a job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from asyncjobs.keys import (
    COUNTERS_KEY,
    CRON_KEY_PREFIX,
    DURATION_KEY,
    HOUR_KEY_PREFIX,
    LATENCY_KEY,
    MINUTE_KEY_PREFIX,
    PROGRESS_KEY_PREFIX,
    RECENT_KEY,
    RUNNING_KEY,
    WORKER_KEY_PREFIX,
    WORKERS_KEY,
)
from asyncjobs.luascript import LuaScript
from jobs.values import as_text

log = logging.getLogger(__name__)


DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# The finished-jobs index keeps an id as long as arq keeps the job's result (`keep_result`),
# and never more than RECENT_MAX ids (a bound on its memory whatever the throughput).
RECENT_MAX = 1_000_000
FLUSH_INTERVAL_S = 1.0
WORKER_TTL_S = 15
# Trends (the dashboard's /ui/trends): per-minute keys for the last hour, per-hour for the day.
MINUTE_TTL_S = 3 * 3600
HOUR_TTL_S = 26 * 3600
OUTCOMES_PER_MINUTE = ("completed", "failed")
TIMED_OUTCOMES = frozenset((*OUTCOMES_PER_MINUTE, "retried"))  # tries that ran to an end

# The queue sampled at each flush: its due jobs and the oldest one's wait, kept as the largest
# sample of the minute and of the hour (jobs/engine/lua/sample_queue.lua).
_SAMPLE_QUEUE = LuaScript("jobs.engine", "sample_queue")


def bucket_for(seconds: float) -> str:
    for bound in DURATION_BUCKETS:
        if seconds <= bound:
            return f"{bound:g}"
    return "+Inf"


@dataclass
class _Pending:
    """Everything not yet written to Redis: hash increments, and float sums."""

    incr: Counter[tuple[str, str]] = field(default_factory=Counter)  # (key, field) -> n
    sums: dict[tuple[str, str], float] = field(default_factory=dict)
    finished: dict[str, float] = field(default_factory=dict)  # job id -> finish time
    cron: dict[str, dict[str, str]] = field(default_factory=dict)
    # (epoch minute, "wait" or a try's outcome, "<function>|<bucket>") -> n: the wait before a
    # start, or a try's run time; made into minute and hour fields at the flush (trend_fields)
    minutes: Counter[tuple[int, str, str]] = field(default_factory=Counter)

    def merge(self, other: _Pending) -> None:
        self.incr.update(other.incr)
        self.minutes.update(other.minutes)
        for key, value in other.sums.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.finished.update(other.finished)
        self.cron.update(other.cron)


class JobMonitor:
    """Buffers one worker's job events and flushes them to Redis every second."""

    def __init__(self, redis: Redis, keep_result_s: float = 24 * 3600) -> None:
        self.redis = redis
        self.keep_result_s = keep_result_s
        self.queue_name: str | None = None  # sampled at each flush for the trends, when set
        self.clock = time.time  # tests give explicit times
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.started_at = time.time()
        self.completed = 0
        self._pending = _Pending()
        self._running: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None

    # -- events: in memory, no I/O --
    def count(self, metric: str, label: str = "", n: int = 1) -> None:
        self._pending.incr[(COUNTERS_KEY, f"{metric}|{label}")] += n

    def _observe(self, key: str, function: str, seconds: float) -> str:
        """Counts `seconds` in `key`'s histogram; its "<function>|<bucket>" field."""
        bucket = f"{function}|{bucket_for(seconds)}"
        self._pending.incr[(key, bucket)] += 1
        self._pending.incr[(key, f"{function}|count")] += 1
        sums = self._pending.sums
        sums[(key, f"{function}|sum")] = sums.get((key, f"{function}|sum"), 0.0) + seconds
        return bucket

    def started(self, job_id: str, function: str, due_ms: float | None) -> None:
        now = self.clock()
        self._running[job_id] = now
        self.count("started", function)
        if due_ms is not None:
            bucket = self._observe(LATENCY_KEY, function, max(0.0, now - due_ms / 1000))
            self._pending.minutes[(int(now // 60), "wait", bucket)] += 1

    def finished(self, job_id: str, function: str, outcome: str, seconds: float) -> None:
        now = self.clock()
        self._running.pop(job_id, None)
        self._pending.finished[job_id] = now
        self.count(outcome, function)
        if outcome == "failed":  # every failure is dead-lettered (see jobs.retry)
            self.count("dead_lettered", function)
        if outcome == "completed":
            self.completed += 1
        bucket = self._observe(DURATION_KEY, function, seconds)
        if outcome in TIMED_OUTCOMES:  # not postponed nor cancelled
            self._pending.minutes[(int(now // 60), outcome, bucket)] += 1

    def cron_ran(self, name: str, result: Any) -> None:
        self._pending.incr[(CRON_KEY_PREFIX + name, "runs")] += 1
        self._pending.cron[name] = {
            "last_run": f"{time.time():.3f}",
            "last_result": json.dumps(result, default=str)[:2000],
        }

    # -- flushing --
    def start(self) -> None:
        self._task = asyncio.create_task(self._flush_forever(), name="job-monitor-flush")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await self.flush()
            await self.redis.srem(WORKERS_KEY, self.worker_id)  # type: ignore[misc]
            await self.redis.delete(WORKER_KEY_PREFIX + self.worker_id)

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                await self.flush()
            except Exception as exc:  # Redis down: keep the counts, try again next second
                log.warning("could not write job stats: %r", exc)

    async def flush(self) -> None:
        pending, self._pending = self._pending, _Pending()
        try:
            await self._write(pending)
        except BaseException:
            pending.merge(self._pending)
            self._pending = pending
            raise

    async def _write(self, pending: _Pending) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for (key, name), n in pending.incr.items():
                pipe.hincrby(key, name, n)
            self._write_trends(pipe, pending)
            for (key, name), total in pending.sums.items():
                pipe.hincrbyfloat(key, name, total)
            if pending.finished:
                pipe.zrem(RUNNING_KEY, *pending.finished)
                pipe.zadd(RECENT_KEY, {j: at * 1000 for j, at in pending.finished.items()})
                # trimmed by age, as arq expires results: every id left has its result kept
                expired_ms = (time.time() - self.keep_result_s) * 1000
                pipe.zremrangebyscore(RECENT_KEY, "-inf", f"({expired_ms}")
                pipe.zremrangebyrank(RECENT_KEY, 0, -RECENT_MAX - 1)
            if self._running:
                pipe.zadd(RUNNING_KEY, {j: at * 1000 for j, at in self._running.items()})
            for name, fields in pending.cron.items():
                pipe.hset(CRON_KEY_PREFIX + name, mapping=fields)
            worker_key = WORKER_KEY_PREFIX + self.worker_id
            worker = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started_at": f"{self.started_at:.3f}",
                "last_seen": f"{time.time():.3f}",
                "running": len(self._running),
                "running_jobs": json.dumps(sorted(self._running)[:50]),
                "completed": self.completed,
            }
            pipe.hset(worker_key, mapping=worker)
            pipe.expire(worker_key, WORKER_TTL_S)
            pipe.sadd(WORKERS_KEY, self.worker_id)
            await pipe.execute()

    def _write_trends(self, pipe: Pipeline, pending: _Pending) -> None:
        """Per-minute and per-hour fields for the trends, in the flush's pipeline (no round
        trip of their own): each minute's counts go to its minute key and to its hour key."""
        for (key, name), n in trend_fields(pending.minutes).items():
            pipe.hincrby(key, name, n)
        for minute in {minute for minute, _, _ in pending.minutes}:
            pipe.expire(f"{MINUTE_KEY_PREFIX}{minute}", MINUTE_TTL_S)
            pipe.expire(f"{HOUR_KEY_PREFIX}{minute // 60}", HOUR_TTL_S)
        if self.queue_name is not None:
            now = self.clock()
            sample_queue(pipe, self.queue_name, now)


def sample_queue(pipe: Pipeline, queue: str, now: float) -> None:
    """Queue sample_queue.lua on the flush's pipeline (as EVAL: no SCRIPT EXISTS round trip)."""
    keys = (queue, minute_key(now), hour_key(now))
    args = (int(now * 1000), MINUTE_TTL_S, HOUR_TTL_S)
    _SAMPLE_QUEUE.queue_eval(pipe, keys, args)


def minute_key(at: float) -> str:
    return f"{MINUTE_KEY_PREFIX}{int(at // 60)}"


def hour_key(at: float) -> str:
    return f"{HOUR_KEY_PREFIX}{int(at // 3600)}"


def trend_fields(minutes: Counter[tuple[int, str, str]]) -> Counter[tuple[str, str]]:
    """(minute, kind, "<function>|<bucket>") counts -> (key, field) increments of minute and
    hour keys: "wait|<function>|<bucket>"; for a try that ran, "run|<function>|<bucket>" and,
    when it completed or failed, "<outcome>|<function>" and the minute's total (the overview's)."""
    out: Counter[tuple[str, str]] = Counter()
    for (minute, kind, bucket), n in minutes.items():
        names = [f"wait|{bucket}"] if kind == "wait" else [f"run|{bucket}"]
        if kind in OUTCOMES_PER_MINUTE:
            names += [f"{kind}|{bucket.rpartition('|')[0]}", kind]
        for key in (f"{MINUTE_KEY_PREFIX}{minute}", f"{HOUR_KEY_PREFIX}{minute // 60}"):
            for name in names:
                out[(key, name)] += n
    return out


async def count_enqueued(redis: Redis, function: str, n: int = 1) -> None:
    """Enqueues happen in web processes and in jobs (fan-outs): counted straight in Redis."""
    await redis.hincrby(COUNTERS_KEY, f"enqueued|{function}", n)  # type: ignore[misc]


PROGRESS_TTL_S = 24 * 3600


class Progress:
    """A long job's done/total/step, for GET /jobs/{id} and the dashboard."""

    def __init__(self, redis: Redis, job_id: str, total: int | None = None) -> None:
        self.redis = redis
        self.key = PROGRESS_KEY_PREFIX + job_id
        self.total = total

    async def update(self, done: int, step: str) -> None:
        fields: dict[str, str | int] = {"done": done, "step": step}
        if self.total is not None:
            fields["total"] = max(self.total, done)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(self.key, mapping=fields)
            pipe.expire(self.key, PROGRESS_TTL_S)
            await pipe.execute()


class StepProgress(BaseModel):
    done: int
    total: int | None = None
    step: str


async def read_progress(redis: Redis, job_id: str) -> StepProgress | None:
    raw = await redis.hgetall(PROGRESS_KEY_PREFIX + job_id)  # type: ignore[misc]
    if not raw:
        return None
    return StepProgress.model_validate({as_text(k): as_text(v) for k, v in raw.items()})
