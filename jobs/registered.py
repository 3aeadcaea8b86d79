"""Registry-driven parts of the worker: the arq function of every job type, users' jobs run
with a typed `JobContext`, and the one enqueue path every producer goes through."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, cast

from arq.connections import ArqRedis
from arq.typing import WorkerCoroutine
from arq.worker import Function, func
from pydantic import BaseModel

import jobs.builtins  # noqa: F401  (registers every built-in job type)
from asyncjobs.context import JobContext
from asyncjobs.registry import JobType, get_job_type, job_types
from asyncjobs.settings import Settings
from jobs.engine.monitor import Progress
from jobs.engine.queue import enqueue_job
from jobs.mail.email import new_message_id
from jobs.retry import ENGINE_TIMEOUT_GRACE_S, Classification, classified, job_timeout
from jobs.webhooks import CALLBACK_KWARG


class UnknownJobType(LookupError):
    """No job type of that name is registered."""


def arq_functions(settings: Settings) -> list[Function]:
    """arq's function list, one per registered job type. arq's own try limit is left unset:
    each job's retry policy is enforced by its wrapper (jobs.retry.classified), which sees
    every try and dead-letters the job itself; arq's deadline is the job's timeout plus a
    grace, so the wrapper's fires first."""
    return [
        func(
            cast(WorkerCoroutine, job_type.function if job_type.builtin else runner(job_type)),
            name=job_type.name,
            timeout=job_timeout(settings, job_type.timeout) + ENGINE_TIMEOUT_GRACE_S,
        )
        for job_type in job_types()
    ]


def runner(job_type: JobType) -> Any:
    """The arq coroutine of a user's job: its arguments checked again by its model (a
    producer may run another version of the code), then the function, with a JobContext."""

    async def run(ctx: dict[str, Any], **kwargs: Any) -> Any:
        arguments = job_type.validate(kwargs)  # a ValidationError is permanent (classified)
        call = job_type.call_arguments(arguments)
        if job_type.takes_context:
            result = await job_type.function(context_of(ctx), **call)
        else:
            result = await job_type.function(**call)
        return result.model_dump(mode="json") if isinstance(result, BaseModel) else result

    run.__name__ = run.__qualname__ = job_type.name
    rules = Classification(job_type.retry, job_type.timeout, job_type.transient, job_type.permanent)
    return classified(rules)(run)


def context_of(ctx: dict[str, Any]) -> JobContext:
    """The typed context of one try, from arq's ctx dict (built by jobs.worker.startup)."""
    redis: ArqRedis = ctx["redis"]
    settings: Settings = ctx["settings"]
    job_id: str = ctx["job_id"]

    async def enqueue(name: str, arguments: dict[str, Any], options: dict[str, Any]) -> str:
        return await enqueue_registered(redis, settings, name, arguments, **options)

    async def progress(done: int, total: int | None, step: str) -> None:
        await Progress(redis, job_id, total).update(done, step)

    return JobContext(
        job_id=job_id,
        job_try=ctx["job_try"],
        enqueue_time=ctx.get("enqueue_time"),
        settings=settings,
        redis=redis,
        http=ctx["http"],
        _enqueue=enqueue,
        _progress=progress,
    )


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
) -> str:
    """Enqueue a registered job: arguments validated by its model, its default priority
    unless one is given, counted for the metrics and waking a worker (one script call). The
    job's id; with `job_id` of a job that exists, that job's id (nothing is enqueued twice).
    Raises UnknownJobType, and pydantic's ValidationError for bad arguments."""
    job_type = job_type_of(name)
    kwargs = call_of(job_type, arguments, settings)
    kwargs["_priority"] = priority or job_type.priority
    if delay_seconds:
        kwargs["_defer_by"] = timedelta(seconds=delay_seconds)
    if job_id is not None:
        kwargs["_job_id"] = job_id
    if callback_url is not None:
        kwargs[CALLBACK_KWARG] = callback_url
    if replicated:
        kwargs["_replicated"] = settings
    new_id = await enqueue_job(redis, job_type.name, **kwargs)
    return new_id if new_id is not None else cast(str, job_id)
