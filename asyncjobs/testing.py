"""Testing a project's own jobs without a worker: `run_job` calls a `@job` function as the
worker would (its arguments checked by its model, a `JobContext` with a real Redis and HTTP
session), and records the follow-up jobs and progress it asked for instead of enqueueing them.

    async def test_invoice() -> None:
        async with job_context(redis_url="redis://127.0.0.1:6379/15") as (ctx, recorded):
            invoice = await run_job(generate_invoice, ctx, order_id=1)
        assert invoice.total_cents == 1999
        assert recorded.enqueued[0].name == "send_email"
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import aiohttp
from arq.connections import ArqRedis

from asyncjobs.context import ENQUEUER, HTTP, PROGRESS, REDIS, SETTINGS, JobContext
from asyncjobs.registry import JOB_NAME_ATTRIBUTE, JobType, get_job_type
from asyncjobs.settings import Settings


class Enqueued(NamedTuple):
    name: str
    arguments: dict[str, Any]
    options: dict[str, Any]


@dataclass
class Recorded:
    """What the job asked for while it ran."""

    enqueued: list[Enqueued] = field(default_factory=list)
    progress: list[tuple[int, int | None, str]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def job_context(
    *,
    redis_url: str = "redis://127.0.0.1:6379/15",
    settings: Settings | None = None,
    job_id: str = "test-job",
    job_try: int = 1,
) -> AsyncIterator[tuple[JobContext, Recorded]]:
    """A context for one try, its Redis client and HTTP session closed on the way out."""
    settings = settings or Settings(_env_file=None, redis_url=redis_url)
    recorded = Recorded()

    async def enqueue(name: str, arguments: dict[str, Any], options: dict[str, Any]) -> str:
        recorded.enqueued.append(Enqueued(name, arguments, options))
        return f"{job_id}-follow-up-{len(recorded.enqueued)}"

    async def progress(_job_id: str, done: int, total: int | None, step: str) -> None:
        recorded.progress.append((done, total, step))

    redis = ArqRedis.from_url(settings.redis_url)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            ctx = JobContext(
                {
                    "job_id": job_id,
                    "job_try": job_try,
                    "enqueue_time": datetime.now(UTC),
                    SETTINGS: settings,
                    REDIS: redis,
                    HTTP: http,
                    ENQUEUER: enqueue,
                    PROGRESS: progress,
                }
            )
            yield ctx, recorded
    finally:
        await redis.aclose()


def job_type_of(function: Any) -> JobType:
    name = getattr(function, JOB_NAME_ATTRIBUTE, None)
    job_type = get_job_type(name) if isinstance(name, str) else None
    if job_type is None:
        raise LookupError(f"{function!r} is not a registered @job function")
    return job_type


async def run_job(function: Any, ctx: JobContext, /, **arguments: Any) -> Any:
    """Call a `@job` function as the worker calls it: the arguments validated by its model
    (pydantic's ValidationError if they are not), then the function; its own result."""
    job_type = job_type_of(function)
    call = job_type.call_arguments(job_type.validate(arguments))
    if job_type.takes_context:
        return await job_type.function(ctx, **call)
    return await job_type.function(**call)
