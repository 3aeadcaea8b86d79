"""Registry-driven parts of the worker: the arq function of every job type, and users' jobs
run with a typed `JobContext`."""

from __future__ import annotations

from typing import Any, cast

from arq.connections import ArqRedis
from arq.typing import WorkerCoroutine
from arq.worker import Function, func
from pydantic import BaseModel

import jobs.builtins  # noqa: F401  (registers every built-in job type)
from asyncjobs.context import ENQUEUER, PROGRESS
from asyncjobs.registry import JobType, job_types
from asyncjobs.settings import Settings
from jobs.context import WorkerContext
from jobs.engine.monitor import Progress
from jobs.engine.unique import Unique
from jobs.enqueue import enqueue_registered
from jobs.retry import ENGINE_TIMEOUT_GRACE_S, Classification, classified, job_timeout


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

    async def run(ctx: WorkerContext, **kwargs: Any) -> Any:
        arguments = job_type.validate(kwargs)  # a ValidationError is permanent (classified)
        call = job_type.call_arguments(arguments)
        if job_type.takes_context:  # the same view of the try the built-ins get
            result = await job_type.function(ctx, **call)
        else:
            result = await job_type.function(**call)
        return result.model_dump(mode="json") if isinstance(result, BaseModel) else result

    run.__name__ = run.__qualname__ = job_type.name
    rules = Classification(job_type.retry, job_type.timeout, job_type.transient, job_type.permanent)
    return classified(rules)(run)


def context_clients(redis: ArqRedis, settings: Settings) -> dict[str, Any]:
    """What `JobContext.enqueue` and `.progress` call, for the worker's start-up to put in
    arq's ctx once: the one enqueue path, and the progress `GET /jobs/{id}` shows."""

    async def enqueue(name: str, arguments: dict[str, Any], options: dict[str, Any]) -> str:
        options = dict(options)
        unique = None
        if (key := options.pop("unique_key", None)) is not None:
            window = options.pop("unique_window_seconds", None)
            unique = Unique.of(key, window, settings, scope=options.pop("unique_scope", None))
        new = await enqueue_registered(redis, settings, name, arguments, unique=unique, **options)
        return new or str(options["job_id"])  # None: the job with that id exists already

    async def progress(job_id: str, done: int, total: int | None, step: str) -> None:
        await Progress(redis, job_id, total).update(done, step)

    return {ENQUEUER: enqueue, PROGRESS: progress}
