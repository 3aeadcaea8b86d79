"""Read a job's state from arq's keys in one round trip."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

from arq.connections import ArqRedis
from arq.jobs import deserialize_job, deserialize_result

from app.schemas import JobView, WaitingFor
from asyncjobs.arqcompat import (
    in_progress_key_prefix,
    job_key_prefix,
    ms_to_datetime,
    result_key_prefix,
    retry_key_prefix,
)
from asyncjobs.jobstate import JobState
from asyncjobs.keys import RETRYING_KEY_PREFIX, RUNNING_KEY, WAITS_KEY_PREFIX
from jobs.engine.dependencies import Waits, waits_of
from jobs.engine.monitor import read_progress
from jobs.mail.newsletter import batch_progress
from jobs.webhooks import read_callback


async def read_job(redis: ArqRedis, job_id: str, queue_name: str) -> JobView:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.get(result_key_prefix + job_id)
        pipe.exists(in_progress_key_prefix + job_id)
        pipe.zscore(queue_name, job_id)
        pipe.get(job_key_prefix + job_id)
        pipe.zscore(RUNNING_KEY, job_id)  # start ms, written by the worker's monitor
        pipe.get(retry_key_prefix + job_id)
        pipe.hgetall(RETRYING_KEY_PREFIX + job_id)
        pipe.hgetall(WAITS_KEY_PREFIX + job_id)  # what it waits for (after, then, callback)
        replies = await pipe.execute()
        raw_result, in_progress, score, raw_job, started_ms, tries, retrying, raw_waits = replies
    # (a running job's start time appears within a second: the monitor writes once a second)

    if raw_result is not None:
        result = deserialize_result(raw_result)
        failed = not result.success
        status = JobState.FAILED if failed else JobState.COMPLETE
        if failed and isinstance(result.result, asyncio.CancelledError):
            status = JobState.ABORTED
        return JobView(
            job_id=job_id,
            status=status,
            function=result.function,
            enqueue_time=result.enqueue_time,
            start_time=result.start_time,
            finish_time=result.finish_time,
            tries=result.job_try,
            result=None if failed else result.result,
            error=describe_error(result.result) if failed else None,
            warning=None if failed else result_warning(result.result),
        )
    if raw_job is None:
        return JobView(job_id=job_id, status=JobState.NOT_FOUND)

    definition = deserialize_job(raw_job)
    waits = waits_of(raw_waits) if raw_waits else None
    if in_progress:
        status = JobState.IN_PROGRESS
    elif score is None and waits is not None and waits.state == "waiting":
        status = JobState.WAITING
    elif score is not None and score > time.time() * 1000:
        status = JobState.DEFERRED
    else:
        status = JobState.QUEUED
    next_try_ms = retrying.get(b"next_try_ms")
    return JobView(
        job_id=job_id,
        status=status,
        function=definition.function,
        enqueue_time=definition.enqueue_time,
        start_time=ms_to_datetime(int(started_ms)) if started_ms and in_progress else None,
        tries=int(tries) if tries else 0,
        error=retrying[b"error"].decode() if b"error" in retrying else None,
        next_try_at=ms_to_datetime(int(next_try_ms)) if next_try_ms and not in_progress else None,
        due_at=ms_to_datetime(int(score)) if status == JobState.DEFERRED else None,
        waiting_for=waiting_for(waits) if status == JobState.WAITING and waits else None,
    )


def waiting_for(waits: Waits) -> WaitingFor:
    """What a waiting job waits for, as its status shows it."""
    shown = waits.shown
    return WaitingFor(
        kind=shown.get("kind", "after"),
        job_ids=shown.get("job_ids", []),
        batch_id=shown.get("batch_id"),
        pending=waits.pending,
        total=waits.total,
    )


async def read_job_with_progress(redis: ArqRedis, queue_name: str, job_id: str) -> JobView:
    """As GET /jobs/{id} shows it: with a newsletter's progress, or the steps a job reported
    (an export's, `JobContext.progress` of a user's job)."""
    view = await read_job(redis, job_id, queue_name)
    view.callback = await read_callback(redis, job_id)
    if view.function == "send_newsletter":
        view.progress = await batch_progress(redis, job_id)
        newsletter_phase(view)
    elif view.function is not None:  # an export's, or what a user's job reported
        view.steps = await read_progress(redis, job_id)
    return view


def newsletter_phase(view: JobView) -> None:
    """A newsletter is done when its last message is, not when its job has fanned out: until
    then it is in progress, `fanning_out` (its job runs) or `sending` (its messages are)."""
    if (
        view.progress
        and view.progress.aborted
        and view.status not in (JobState.QUEUED, JobState.IN_PROGRESS)
    ):
        view.status = JobState.ABORTED  # its job has ended (or was aborted) and no message is left
    elif view.status == JobState.IN_PROGRESS:
        view.phase = "fanning_out"
    elif view.status == JobState.COMPLETE and view.progress and view.progress.pending > 0:
        view.status, view.phase = JobState.IN_PROGRESS, "sending"


def result_warning(result: object) -> str | None:
    """What a complete job's result says went partly wrong: an email some recipients refused."""
    if not isinstance(result, dict):
        return None
    refused, accepted = result.get("refused"), result.get("accepted") or []
    if not refused or not isinstance(refused, dict):
        return None
    total = len(refused) + len(accepted)
    details = "; ".join(f"{rcpt}: {why}" for rcpt, why in refused.items())
    return f"{len(refused)} of {total} recipients refused: {details}"


def describe_error(exc: object) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "aborted"
    if isinstance(exc, BaseException):
        text = str(exc)
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return str(exc)


READ_CONCURRENCY = 16  # read_job round trips in flight at once, to spare the connection pool


async def read_jobs(redis: ArqRedis, queue_name: str, ids: Iterable[str]) -> list[JobView]:
    """Several jobs' states, in the order of `ids`."""
    limiter = asyncio.Semaphore(READ_CONCURRENCY)

    async def one(job_id: str) -> JobView:
        async with limiter:
            return await read_job(redis, job_id, queue_name)

    return list(await asyncio.gather(*(one(job_id) for job_id in ids)))
