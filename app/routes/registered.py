"""Routes derived from the job registry: `POST /jobs/<name>` for each user's job type, and
`GET /jobs/types` listing every job type (built-ins included) with its schemas and policy.

An enqueue with an `Idempotency-Key` gets a job id derived from the key (and the caller's
API key), so a retry after an unclear answer (a 503 while replicas confirm, a dropped
connection) finds the job already there and returns it: it cannot enqueue twice.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel

from app.auth import charge_more
from app.http import (
    JOB_TYPES_SEGMENT,
    charge_follow_ups,
    json_model,
    owner_of,
    status_url,
    unique_holder,
)
from app.idempotency import idempotent, new_job_id
from app.joboptions import read_job_request
from app.schemas import JobAccepted
from app.state import REDIS, SETTINGS
from asyncjobs.registry import JobType, job_types, user_job_types
from jobs.engine.dependencies import UnknownParent
from jobs.engine.unique import is_existing
from jobs.enqueue import enqueue_registered
from jobs.retry import job_timeout


class JobTypeView(BaseModel):
    name: str
    builtin: bool
    endpoint: str | None  # where to enqueue it (a built-in's own endpoint takes its own body)
    summary: str
    priority: str
    cost: int
    schedulable: bool
    max_tries: int
    timeout_seconds: float
    arguments: dict[str, Any] | None  # JSON schema of a user's job's arguments
    result: dict[str, Any] | None


class JobTypeList(BaseModel):
    job_types: list[JobTypeView]


def endpoint_of(job_type: JobType) -> str | None:
    """Where to enqueue it: a user's job by its name, a built-in at its own endpoint (none
    for the jobs only the worker enqueues)."""
    return f"/jobs/{job_type.public_name}" if job_type.public_name else None


def enqueue_handler(job_type: JobType) -> Any:
    @idempotent
    async def enqueue(request: web.Request) -> web.Response:
        settings = request.app[SETTINGS]
        options, body = await read_job_request(request)
        arguments = job_type.validate(body)  # 422 naming the field, before anything is stored
        key_job_id = new_job_id(request) if "Idempotency-Key" in request.headers else None
        unique = options.unique()
        holder = await unique_holder(request, job_type.name, unique, key_job_id)
        if holder is not None:  # the unique key's job, already there: its cost not charged
            answer = JobAccepted(
                job_id=holder, status_url=status_url(request, holder), existing=True
            )
            return json_model(answer, status=202)
        await charge_more(request, job_type.cost)
        await charge_follow_ups(request, options.dependencies())
        try:
            new_id = await enqueue_registered(
                request.app[REDIS],
                settings,
                job_type.name,
                arguments.model_dump(mode="json"),
                priority=options.priority,
                delay_seconds=options.delay_ms() / 1000 or None,
                job_id=key_job_id,
                callback_url=str(options.callback_url) if options.callback_url else None,
                replicated=True,
                owner=owner_of(request) or None,
                unique=unique,
                dependencies=options.dependencies(),
            )
        except UnknownParent as exc:
            raise web.HTTPUnprocessableEntity(text=f"after: {exc}") from None
        job_id = new_id or key_job_id  # None: the key's job exists (a retry): that one
        assert job_id is not None
        accepted = JobAccepted(
            job_id=job_id, status_url=status_url(request, job_id), existing=is_existing(job_id)
        )
        return json_model(accepted, status=202)

    enqueue.__name__ = f"enqueue_{job_type.name}"
    return enqueue


def view_of(job_type: JobType, settings: Any) -> JobTypeView:
    policy = job_type.policy(settings)
    return JobTypeView(
        name=job_type.name,
        builtin=job_type.builtin,
        endpoint=endpoint_of(job_type),
        summary=job_type.summary,
        priority=job_type.priority,
        cost=job_type.cost,
        schedulable=job_type.schedulable,
        max_tries=policy.max_tries,
        timeout_seconds=job_timeout(settings, job_type.timeout),
        arguments=job_type.arguments.model_json_schema() if job_type.arguments else None,
        result=job_type.result_schema() or None,
    )


async def list_job_types(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return json_model(JobTypeList(job_types=[view_of(t, settings) for t in job_types()]))


def add_registered_routes(app: web.Application) -> None:
    app.router.add_get(f"/jobs/{JOB_TYPES_SEGMENT}", list_job_types)
    for job_type in user_job_types():
        app.router.add_post(f"/jobs/{job_type.name}", enqueue_handler(job_type))
