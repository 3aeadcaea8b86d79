"""The one enqueue path every producer takes: the API, schedules, sources, the newsletter's
fan-out, jobs enqueueing follow-ups (`JobContext.enqueue`) and the client through the API.

It looks the job type up in the registry, checks a user's job's arguments with its model,
applies the type's default priority, and enqueues through the engine's script
(jobs.engine.queue), which counts the job for the metrics and wakes a waiting worker in the
same round trip. A job id that exists already is never enqueued twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from arq.connections import ArqRedis

from asyncjobs.addresses import new_message_id
from asyncjobs.registry import JobType, get_job_type
from asyncjobs.settings import Settings
from jobs.engine.dependencies import Dependencies, enqueue_with
from jobs.engine.queue import (
    CALLBACK_KWARG,
    OWNER_KWARG,
    UNIQUE_KWARG,
    enqueue_job,
    enqueue_jobs,
)
from jobs.engine.unique import Unique


class UnknownJobType(LookupError):
    """No job type of that name is registered."""


def job_type_of(name: str) -> JobType:
    job_type = get_job_type(name)
    if job_type is None:
        raise UnknownJobType(f"no job type {name!r} is registered")
    return job_type


def call_of(job_type: JobType, arguments: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The keyword arguments stored in the job: a user's, checked by its model and stored as
    JSON; a built-in's as given (its worker checks them), with what its enqueue must fix
    (an email's Message-ID, the same on every retry)."""
    if job_type.arguments is not None:
        return job_type.validate(arguments).model_dump(mode="json")
    call = dict(arguments)
    if job_type.name == "send_email" and not call.get("message_id"):
        sender = (call.get("email") or {}).get("from") or settings.mail_from
        call["message_id"] = new_message_id(sender)
    return call


def _options(
    job_type: JobType,
    settings: Settings,
    priority: str | None,
    delay_seconds: float | None,
    job_id: str | None,
    callback_url: str | None,
    owner: str | None = None,
    unique: Unique | None = None,
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "_priority": priority or job_type.priority,
        "_queue_name": settings.queue_name,
    }
    if delay_seconds:
        options["_defer_by"] = timedelta(seconds=delay_seconds)
    if job_id is not None:
        options["_job_id"] = job_id
    if callback_url is not None:
        options[CALLBACK_KWARG] = callback_url
    if owner is not None:
        options[OWNER_KWARG] = owner
    if unique is not None:
        options[UNIQUE_KWARG] = unique
    return options


async def enqueue_registered(
    redis: ArqRedis,
    settings: Settings,
    name: str,
    arguments: dict[str, Any],
    *,
    priority: str | None = None,
    delay_seconds: float | None = None,
    job_id: str | None = None,
    callback_url: str | None = None,
    replicated: bool = False,
    owner: str | None = None,
    unique: Unique | None = None,
    dependencies: Dependencies | None = None,
) -> str | None:
    """Enqueue one job of a registered type; its id, or None when a job with `job_id` exists
    already. With `unique`, while the job holding its key is there, that job's id (an
    ExistingJob: jobs.engine.unique) and nothing enqueued. With `replicated` and
    REDIS_WAIT_REPLICAS, only once replicas have it. With `dependencies` (`after`, `then`),
    through jobs.engine.dependencies. Raises UnknownJobType, UnknownParent, and pydantic's
    ValidationError for bad arguments."""
    job_type = job_type_of(name)
    kwargs = call_of(job_type, arguments, settings)
    kwargs |= _options(
        job_type, settings, priority, delay_seconds, job_id, callback_url, owner, unique
    )
    if replicated:
        kwargs["_replicated"] = settings
    if dependencies is not None:
        return await enqueue_with(redis, job_type.name, kwargs, dependencies)
    return await enqueue_job(redis, job_type.name, **kwargs)


async def enqueue_registered_many(
    redis: ArqRedis,
    settings: Settings,
    name: str,
    calls: Sequence[tuple[dict[str, Any], str | None]],
    *,
    priority: str | None = None,
    callback_url: str | None = None,
    owner: str | None = None,
    unique: Unique | None = None,
) -> list[str | None]:
    """`enqueue_registered` for many jobs of one type, (arguments, job id) each, in one
    pipelined round trip; each new job's id, None for one that existed (with `unique`, the
    first takes the key: the others answer its holder)."""
    job_type = job_type_of(name)
    prepared = [
        call_of(job_type, arguments, settings)
        | _options(job_type, settings, priority, None, job_id, callback_url, owner, unique)
        for arguments, job_id in calls
    ]
    return await enqueue_jobs(redis, job_type.name, prepared)
