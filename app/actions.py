"""Operations on jobs that both the HTTP API and the dashboard's buttons perform: enqueue
(counted, waking a worker), abort, retry a dead letter, export."""

from __future__ import annotations

from typing import Any
from uuid import uuid4

from aiohttp import web
from arq.connections import ArqRedis

from app.jobstatus import read_job, read_job_with_progress
from app.schemas import JobView
from asyncjobs.arqcompat import abort_jobs_ss, timestamp_ms
from asyncjobs.jobstate import ACTIVE, JobState
from asyncjobs.registry import Priority, get_job_type
from asyncjobs.settings import Settings
from jobs.deadletter import add_dead_letter, get_dead_letter, remove_dead_letter
from jobs.engine.dependencies import (
    DEPENDENCIES_KWARG,
    Dependencies,
    UnknownParent,
    enqueue_with,
    mark_aborted,
)
from jobs.engine.queue import enqueue_job, enqueue_jobs
from jobs.housekeeping.export import ExportRequest
from jobs.mail.newsletter import abort_batch, abort_message

ABORTABLE = ACTIVE


def default_priority(function: str) -> Priority:
    """The registered job type's priority (a name no type has: bulk, and its worker will
    dead-letter it as unknown)."""
    job_type = get_job_type(function)
    return job_type.priority if job_type is not None else "bulk"


async def enqueue(
    redis: ArqRedis, function: str, /, *, _existing_ok: bool = False, **kwargs: Any
) -> str:
    """Enqueue an arq job, count it for the metrics and wake a waiting worker, in one round
    trip (jobs.engine.queue.enqueue_job); the job's id. arq's `_job_id` etc. pass through
    (positional-only names leave every keyword to the job). A `_job_id` that exists is a 409,
    or with `_existing_ok` the answer (the caller's own earlier try enqueued it)."""
    kwargs.setdefault("_priority", default_priority(function))
    chosen: str | None = kwargs.get("_job_id")
    job_id = await _enqueue_one(redis, function, kwargs)
    if job_id is not None:
        return job_id
    if _existing_ok and chosen is not None:
        return chosen
    raise web.HTTPConflict(text=f"job {chosen} already exists")


async def _enqueue_one(redis: ArqRedis, function: str, kwargs: dict[str, Any]) -> str | None:
    """One job, through the engine's dependencies when it has `after` or `then` (its
    DEPENDENCIES_KWARG, from app.joboptions); an `after` naming no job is a 422."""
    deps: Dependencies | None = kwargs.pop(DEPENDENCIES_KWARG, None)
    if deps is None:
        return await enqueue_job(redis, function, **kwargs)
    try:
        return await enqueue_with(redis, function, kwargs, deps)
    except UnknownParent as exc:
        raise web.HTTPUnprocessableEntity(text=f"after: {exc}") from None


async def enqueue_many(
    redis: ArqRedis,
    function: str,
    calls: list[dict[str, Any]],
    replicated: Settings | None = None,
    existing_ok: bool = False,
) -> list[str]:
    """`enqueue` for many jobs of one function in one round trip; their ids, in order."""
    priority = default_priority(function)
    if any(DEPENDENCIES_KWARG in call for call in calls):  # see POST /batches' callback
        raise web.HTTPUnprocessableEntity(text="'after' and 'then' take one job, not a batch")
    calls = [{"_priority": priority} | call for call in calls]
    ids = await enqueue_jobs(redis, function, calls, replicated)
    chosen = [call.get("_job_id") for call in calls]
    taken = [wanted for wanted, job_id in zip(chosen, ids, strict=True) if not job_id]
    if taken and not (existing_ok and all(taken)):
        raise web.HTTPConflict(text=f"jobs {', '.join(map(str, taken))} already exist")
    return [job_id or str(wanted) for job_id, wanted in zip(ids, chosen, strict=True)]


async def abort(redis: ArqRedis, queue_name: str, job_id: str) -> JobView:
    """Ask the workers to abort a queued, deferred or running job; its state before asking.
    A job in any other state is left alone. A newsletter is running while its messages are
    sent, after its own job has ended: aborting it stops them (jobs.mail.newsletter)."""
    view = await read_job(redis, job_id, queue_name)
    if view.function == "send_newsletter":
        shown = await read_job_with_progress(redis, queue_name, job_id)
        if shown.status in ABORTABLE:
            await abort_batch(redis, job_id)
        if view.status not in ABORTABLE:  # its job has fanned out: the messages were the rest
            return shown
    if view.status not in ABORTABLE:
        return view
    now = timestamp_ms()
    async with redis.pipeline(transaction=True) as pipe:
        # deferred: made due now, so a worker picks it up and aborts it at once
        if view.status == JobState.DEFERRED:
            pipe.zadd(queue_name, {job_id: now}, xx=True)
        if view.status == JobState.WAITING:  # not in the queue: put there, to end as aborted
            mark_aborted(pipe, queue_name, job_id)
            pipe.zadd(queue_name, {job_id: now})
        pipe.zadd(abort_jobs_ss, {job_id: now})
        await pipe.execute()
    if view.function == "send_email":  # a newsletter's message: counted, its callback not held
        await abort_message(redis, job_id)
    return view


async def retry_dead_letter(redis: ArqRedis, entry_id: str) -> str | None:
    """Enqueue a dead letter again as a new job; None if there is no such entry. Taking the
    entry out first means two retries cannot both enqueue it; a failed enqueue puts it back."""
    entry = await get_dead_letter(redis, entry_id)
    if entry is None or not await remove_dead_letter(redis, entry.id):
        return None
    try:
        return await enqueue(redis, entry.function, **entry.arguments)
    except BaseException:
        await add_dead_letter(redis, entry)
        raise


async def export_all_csv(redis: ArqRedis) -> str:
    """Enqueue an export of every document as CSV; the job id, which is also the export id."""
    export_id = uuid4().hex
    request = ExportRequest(format="csv").model_dump(mode="json")
    return await enqueue(redis, "export", export_id=export_id, request=request, _job_id=export_id)
