"""The queue's Redis operations as Lua scripts (jobs/engine/lua/): enqueue one job, claim a
batch, finish a batch, renew leases.

The data layout is arq 0.28's (job, in-progress, retry and result keys, the queue sorted set,
the abort set), so arq's own `enqueue_job`, `Job` and our status reads keep working. What
differs is the number of round trips: arq enqueues with WATCH/MULTI (4 round trips), claims each
job with WATCH/EXISTS/ZSCORE/MULTI/PSETEX/EXEC then MULTI/GET/INCR/EXPIRE/ZREM/EXEC and finishes
each with its own MULTI/EXEC; here each of the three is one script call, claims and finishes for
many jobs at once.

One change of meaning: a claimed job's score in the queue is pushed to the end of its lease
(a "visibility timeout"), and the worker renews both the score and the in-progress key while the
job runs. So a claim reads only jobs nobody runs, instead of stepping over every running job at
the head of the queue, and a dead worker's jobs become due again when their lease ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from uuid import uuid4

from arq.connections import ArqRedis
from arq.jobs import serialize_job
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from asyncjobs.arqcompat import (
    abort_jobs_ss,
    expires_extra_ms,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
    timestamp_ms,
    to_ms,
)
from asyncjobs.keys import (
    COUNTERS_KEY,
    DEPENDENTS_KEY_PREFIX,
    ENDED_KEY_PREFIX,
    TRIES_KEPT,
    TRIES_KEY_PREFIX,
    WAITS_KEY_PREFIX,
    bulk_turn_key,
    transactional_key,
    wake_key,
)
from asyncjobs.luascript import Arg, LuaScript
from asyncjobs.redis import execute_replicated
from asyncjobs.registry import PRIORITIES, Priority
from asyncjobs.settings import Settings
from asyncjobs.tracing import inject_trace, send_span
from jobs.engine.unique import ExistingJob, Unique

RETRY_KEY_TTL_S = 88400  # arq's
# A completion webhook's URL, carried in the job's kwargs beside arq's options; the runner
# takes it out before the job's function sees its arguments (jobs.webhooks sends it).
CALLBACK_KWARG = "_callback_url"
# The API key a job was enqueued for (its id, as app/auth.py names keys), carried the same way:
# the runner hands it to the job's context, and the CPU pool takes turns between owners.
OWNER_KWARG = "_owner"
# A unique key (jobs.engine.unique.Unique): while the job holding it is there, that job's id
# (an ExistingJob) is the enqueue's answer and nothing is enqueued.
UNIQUE_KWARG = "_unique"
FINISH_BATCH = 200  # jobs per finish script call: bounds how long Redis runs one script
KEEP_AFTER_NEXT_TRY_MS = expires_extra_ms  # arq's: a day
# How long a finished job's ended marker is kept when it keeps no result (else its result's
# TTL): an `after` naming it is resolved from the marker (jobs/engine/dependencies.py).
ENDED_TTL_MS = 24 * 3600 * 1000
# While transactional and bulk jobs both wait, one claim in this many takes a bulk job.
BULK_SHARE_EVERY = 10


# The scripts (jobs/engine/lua/), each called through one wrapper below that names its keys
# and arguments: _Enqueue, claim, finish (with Finish) and renew_leases.
_ENQUEUE = LuaScript("jobs.engine", "enqueue")
_CLAIM = LuaScript("jobs.engine", "claim")
_FINISH = LuaScript("jobs.engine", "finish")
_RENEW = LuaScript("jobs.engine", "renew")


async def enqueue_job(redis: ArqRedis, function: str, /, **kwargs: Any) -> str | None:
    """arq's `enqueue_job` in one round trip, which also counts the job for the metrics and
    wakes a waiting worker: the new job's id, or None if a job with `_job_id` exists.
    Takes arq's options: `_job_id`, `_queue_name`, `_defer_by`, `_expires`, `_job_try`,
    `_priority` ("bulk" unless it says "transactional": ahead of bulk, see claim.lua),
    `_unique` (a Unique: the id of the job holding it, an ExistingJob, while it is there), and
    `_replicated` (the settings: with REDIS_WAIT_REPLICAS, return only once replicas have the
    job, else NotReplicatedError)."""
    settings: Settings | None = kwargs.pop("_replicated", None)
    with send_span(function):  # the job's record carries this span's context (inject_trace)
        call = _enqueue_call(redis, function, kwargs)
        if settings is None or not settings.redis_wait_replicas:
            added = await call.run(redis)
        else:  # WAIT on the enqueue's own connection: a pipeline of the two
            async with redis.pipeline(transaction=False) as pipe:
                await call.run(redis, pipe)
                [added] = await execute_replicated(pipe, settings)
    return _answer(call.job_id, added)


async def enqueue_jobs(
    redis: ArqRedis,
    function: str,
    calls: Sequence[dict[str, Any]],
    replicated: Settings | None = None,
) -> list[str | None]:
    """`enqueue_job` for many jobs of one function, in one pipelined round trip (and, with
    `replicated` settings asking for it, a WAIT for replicas at its end)."""
    ids = []
    with send_span(function, batch=len(calls)):
        async with redis.pipeline(transaction=False) as pipe:
            for kwargs in calls:
                call = _enqueue_call(redis, function, dict(kwargs))
                await call.run(redis, pipe)
                ids.append(call.job_id)
            added = await (execute_replicated(pipe, replicated) if replicated else pipe.execute())
    return [_answer(job_id, ok) for job_id, ok in zip(ids, added, strict=True)]


def _answer(job_id: str, added: Any) -> str | None:
    """enqueue.lua's reply as an id: the new job's, the unique key's holder's (bytes: an
    ExistingJob), or None for a taken id."""
    if isinstance(added, bytes | str):
        return ExistingJob(added.decode() if isinstance(added, bytes) else added)
    return job_id if added else None


@dataclass(frozen=True, slots=True)
class _Enqueue:
    """One call of enqueue.lua: one job, as arq 0.28 stores it."""

    job_id: str
    queue: str
    job: bytes  # serialized as arq serializes it
    expires_ms: int  # the job's data TTL
    score: int  # ms: when it is due
    function: str
    transactional: bool
    unique_key: str | None = None  # the Redis key of its Unique, if it has one
    unique_window_ms: int = 0

    async def run(self, redis: Redis, pipe: Pipeline | None = None) -> Any:
        """1 if the job was added, 0 if its id was taken, the holder's id (bytes) if its
        unique key is held (or, on `pipe`, the pipeline)."""
        keys = [
            job_key_prefix + self.job_id,
            result_key_prefix + self.job_id,
            self.queue,
            COUNTERS_KEY,
            wake_key(self.queue),
            transactional_key(self.queue),
        ]
        args: list[Arg] = [
            self.job,
            self.expires_ms,
            self.score,
            self.job_id,
            f"enqueued|{self.function}",
            "1" if self.transactional else "0",
        ]
        if self.unique_key is not None:
            keys.append(self.unique_key)
            args += [self.unique_window_ms, job_key_prefix]
        return await _ENQUEUE.run(redis, keys, args, pipe)


def _enqueue_call(redis: ArqRedis, function: str, kwargs: dict[str, Any]) -> _Enqueue:
    """The enqueue script's call for one job; takes arq's options out of `kwargs`, leaving the
    job's own arguments."""
    job_id: str = kwargs.pop("_job_id", None) or uuid4().hex
    queue: str = kwargs.pop("_queue_name", None) or redis.default_queue_name
    defer_ms = to_ms(kwargs.pop("_defer_by", None)) or 0
    expires_ms = to_ms(kwargs.pop("_expires", None))
    job_try: int | None = kwargs.pop("_job_try", None)
    priority: Priority = kwargs.pop("_priority", None) or "bulk"
    unique: Unique | None = kwargs.pop(UNIQUE_KWARG, None)
    if priority not in PRIORITIES:
        raise ValueError(f"_priority must be one of {PRIORITIES}, not {priority!r}")
    if "_defer_until" in kwargs:
        raise TypeError("enqueue_job takes _defer_by, not _defer_until")
    inject_trace(kwargs, queue, job_id)  # the send span's traceparent, in the job's record
    enqueued_ms = timestamp_ms()
    job = serialize_job(function, (), kwargs, job_try, enqueued_ms, serializer=redis.job_serializer)
    return _Enqueue(
        job_id=job_id,
        queue=queue,
        job=job,
        expires_ms=expires_ms or defer_ms + redis.expires_extra_ms,
        score=enqueued_ms + defer_ms,
        function=function,
        transactional=priority == "transactional",
        unique_key=unique.redis_key(function, kwargs.get(OWNER_KWARG)) if unique else None,
        unique_window_ms=unique.window_ms if unique else 0,
    )


def waiting_counts(due: int, not_due: int, running: int) -> tuple[int, int]:
    """(queued, deferred) from ZCOUNTs of the queue up to now and after now: a running job's
    score is the end of its lease, so it is among the ones after now, not a deferred job."""
    return due, max(0, not_due - running)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job this worker now holds: its lease is set, its try counted."""

    job_id: str
    score: int
    raw: bytes | None  # None: the job's data expired before anyone ran it
    job_try: int
    aborted: bool  # aborted while queued: finish it without running it


class Claims(NamedTuple):
    aborts: list[str]  # the ids in the abort set (usually none)
    jobs: list[Claimed]
    next_due_ms: int | None  # the earliest score in the queue after now, if any


async def claim(redis: Redis, queue: str, limit: int, lease_ms: int) -> Claims:
    """Claim up to `limit` due jobs, transactional ones first (bulk keeps one claim in
    BULK_SHARE_EVERY while both wait). The script finds the jobs' ids itself, so their keys
    go as prefixes, not in KEYS (docs/engine.md, "Redis scripts and Redis Cluster")."""
    keys = [queue, abort_jobs_ss, transactional_key(queue), bulk_turn_key(queue)]
    args: list[str | int] = [
        timestamp_ms(),
        limit,
        lease_ms,
        in_progress_key_prefix,
        job_key_prefix,
        retry_key_prefix,
        RETRY_KEY_TTL_S,
        BULK_SHARE_EVERY,
    ]
    aborts, flat, next_due = await _CLAIM.run(redis, keys, args)
    claimed = [
        Claimed(
            job_id=flat[i].decode(),
            score=int(float(flat[i + 1])),
            raw=flat[i + 2],
            job_try=int(flat[i + 3]),
            aborted=bool(flat[i + 4]),
        )
        for i in range(0, len(flat), 5)
    ]
    return Claims([a.decode() for a in aborts], claimed, int(float(next_due)) if next_due else None)


@dataclass(frozen=True, slots=True)
class Finish:
    """How one try of a job ends in Redis."""

    job_id: str
    done: bool  # True: out of the queue (result kept); False: back in it at `score`
    result: bytes | None = None
    result_ttl_ms: int = 0  # 0: keep the result for ever
    score: int = 0
    keep_in_progress_ms: int = 0  # cron jobs keep their in-progress key a while (arq's rule)
    counts_as_try: bool = True  # False: a postponed run, the job's try count is given back
    try_record: bytes = b""  # JSON: this try for the job's tries list (b"": none)
    # a job that ended for good: "complete", "failed" or "aborted", and why it failed; its
    # ended marker and the jobs waiting on it are written from these (jobs/engine/dependencies)
    outcome: str = ""
    error: str = ""

    def keys(self) -> tuple[str, str, str, str, str, str, str]:
        """finish.lua's seven keys for this job."""
        job_id = self.job_id
        return (
            in_progress_key_prefix + job_id, job_key_prefix + job_id,
            retry_key_prefix + job_id, result_key_prefix + job_id, TRIES_KEY_PREFIX + job_id,
            DEPENDENTS_KEY_PREFIX + job_id, ENDED_KEY_PREFIX + job_id,
        )  # fmt: skip

    def fields(self) -> tuple[str, str, bytes, int, int, int, bytes, str, str]:
        """finish.lua's nine arguments for this job."""
        mode = "done" if self.done else "again" if self.counts_as_try else "later"
        result = self.result or b""
        outcome = self.outcome if self.done else ""
        return (
            self.job_id, mode, result, self.result_ttl_ms, self.score,
            self.keep_in_progress_ms, self.try_record, outcome, self.error,
        )  # fmt: skip


async def finish(redis: Redis, queue: str, finishes: Sequence[Finish]) -> None:
    """Write how each job ended, FINISH_BATCH at a time."""
    for start in range(0, len(finishes), FINISH_BATCH):
        keys = [queue, abort_jobs_ss, transactional_key(queue)]
        args: list[Any] = [
            timestamp_ms(), KEEP_AFTER_NEXT_TRY_MS, TRIES_KEPT, WAITS_KEY_PREFIX, ENDED_TTL_MS,
        ]  # fmt: skip
        for item in finishes[start : start + FINISH_BATCH]:
            keys.extend(item.keys())
            args.extend(item.fields())
        await _FINISH.run(redis, keys, args)


async def renew_leases(redis: Redis, queue: str, job_ids: Iterable[str], lease_ms: int) -> None:
    """Keep the jobs this worker runs hidden and marked in progress for another lease. A job
    whose in-progress key is gone has just finished: its score is left alone."""
    ids = list(job_ids)
    if ids:
        keys = [queue, transactional_key(queue), *(in_progress_key_prefix + i for i in ids)]
        args: list[str | int] = [timestamp_ms() + lease_ms, lease_ms, *ids]
        await _RENEW.run(redis, keys, args)
