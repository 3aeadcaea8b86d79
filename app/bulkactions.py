"""Bulk operations behind the dashboard's checkboxes: retry or delete many dead letters, abort
many queued jobs. Each is a few pipelined round trips however many entries, and takes at most
BULK_MAX ids per call (a request past that is refused, not cut short)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime

from arq.connections import ArqRedis
from arq.jobs import DeserializationError, deserialize_job

from app.actions import abort, enqueue_many
from app.jobstatus import read_job
from asyncjobs.arqcompat import (
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    ms_to_datetime,
    result_key_prefix,
    timestamp_ms,
)
from asyncjobs.jobstate import JobState
from jobs.deadletter import DeadLetter, add_dead_letters, remove_dead_letters, take_dead_letters
from jobs.mail.newsletter import abort_message

log = logging.getLogger(__name__)

BULK_MAX = 1000  # ids per request: one request's pipelines stay a few hundred KB


class TooMany(ValueError):
    """More than BULK_MAX ids in one call."""


@dataclass(frozen=True)
class BulkResult:
    done: int  # retried, deleted or asked to abort
    missing: int  # gone already: retried, deleted or finished, by someone else or earlier
    failed: int = 0  # could not be done (a retry's enqueue failed: the entry is back)


def unique_ids(ids: list[str]) -> list[str]:
    """Each id once, in order; TooMany past BULK_MAX."""
    unique = list(dict.fromkeys(ids))
    if len(unique) > BULK_MAX:
        raise TooMany(f"{len(unique)} ids: at most {BULK_MAX} per request")
    return unique


async def retry_dead_letters(redis: ArqRedis, entry_ids: list[str]) -> BulkResult:
    """Enqueue each entry again as a new job, as retry_dead_letter does one: the entries are
    taken out first (so two operators' retries enqueue each once), then enqueued one round
    trip per function; a function's enqueue that fails puts its entries back."""
    ids = unique_ids(entry_ids)
    taken = await take_dead_letters(redis, ids)
    groups: dict[str, list[DeadLetter]] = defaultdict(list)
    for entry in taken:
        groups[entry.function].append(entry)
    failed: list[DeadLetter] = []
    try:
        while groups:
            function, group = groups.popitem()
            try:
                await enqueue_many(redis, function, [dict(e.arguments) for e in group])
            except BaseException as exc:
                failed += group
                if not isinstance(exc, Exception):  # cancelled: put back, then stop
                    raise
                log.warning("retrying %d %s dead letters failed: %s", len(group), function, exc)
    finally:
        unsent = failed + [entry for group in groups.values() for entry in group]
        if unsent:
            await add_dead_letters(redis, unsent)
    done, missing = len(taken) - len(failed), len(ids) - len(taken)
    return BulkResult(done=done, missing=missing, failed=len(failed))


async def delete_dead_letters(redis: ArqRedis, entry_ids: list[str]) -> BulkResult:
    ids = unique_ids(entry_ids)
    deleted = await remove_dead_letters(redis, ids)
    return BulkResult(done=deleted, missing=len(ids) - deleted)


@dataclass(frozen=True)
class Waiting:
    job_id: str
    function: str
    enqueued_at: datetime
    due_at: datetime | None  # a deferred job's time; None once due


async def waiting_jobs(redis: ArqRedis, queue_name: str, job_ids: list[str]) -> list[Waiting]:
    """The jobs that are still queued or deferred (not running, not finished), in one round
    trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.exists(result_key_prefix + job_id)
            pipe.exists(in_progress_key_prefix + job_id)
            pipe.zscore(queue_name, job_id)
            pipe.get(job_key_prefix + job_id)
        replies = await pipe.execute()
    now_ms = time.time() * 1000
    waiting = []
    for n, job_id in enumerate(job_ids):
        finished, running, score, raw = replies[4 * n : 4 * n + 4]
        if finished or running or score is None or raw is None:
            continue
        try:
            job = deserialize_job(raw)
        except DeserializationError:
            continue
        due_at = ms_to_datetime(int(score)) if score > now_ms else None
        waiting.append(Waiting(job_id, job.function, job.enqueue_time, due_at))
    return waiting


async def abort_queued(redis: ArqRedis, queue_name: str, job_ids: list[str]) -> BulkResult:
    """Ask the workers to abort each job that is still queued or deferred, in one transaction
    (a deferred one is made due, so a worker picks it up and aborts it at once, as `abort`
    does); a newsletter through `abort`, which also stops its messages, and a newsletter's
    message counted as aborted in its progress (its callback does not wait for it); a job
    waiting for others through `abort` too. Running and finished jobs are left alone and
    counted as missing."""
    ids = unique_ids(job_ids)
    waiting = await waiting_jobs(redis, queue_name, ids)
    plain = [job for job in waiting if job.function != "send_newsletter"]
    now = timestamp_ms()
    async with redis.pipeline(transaction=True) as pipe:
        for job in plain:
            if job.due_at is not None:
                pipe.zadd(queue_name, {job.job_id: now}, xx=True)
            pipe.zadd(abort_jobs_ss, {job.job_id: now})
        await pipe.execute()
    for job in waiting:
        if job.function == "send_newsletter":
            await abort(redis, queue_name, job.job_id)
        elif job.function == "send_email":  # a newsletter's message: counted, as `abort` does
            await abort_message(redis, job.job_id)
    found = {job.job_id for job in waiting}
    # a job waiting for others is in no queue: `abort` takes it out of its waiting index too
    held = [job_id for job_id in ids if job_id not in found]
    views = [await read_job(redis, job_id, queue_name) for job_id in held]
    for view in views:
        if view.status == JobState.WAITING:
            await abort(redis, queue_name, view.job_id)
    done = len(waiting) + sum(view.status == JobState.WAITING for view in views)
    return BulkResult(done=done, missing=len(ids) - done)
