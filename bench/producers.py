"""How each arq engine's jobs get into Redis: every engine with its own producer.

- plain arq: `ArqRedis.enqueue_job`.
- asyncjobs: `app.actions.enqueue`, what the project's API and dashboard call for every job
  (enqueue_job, then count the job for the metrics and wake a waiting worker), so the bench
  measures the worker as production feeds it, producer-side Redis commands included.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from arq.connections import ArqRedis

from app.actions import enqueue

# (pool, function name, keyword arguments) -> job id
Producer = Callable[[ArqRedis, str, dict[str, Any]], Awaitable[str]]


async def plain_arq(pool: ArqRedis, function: str, kwargs: dict[str, Any]) -> str:
    job = await pool.enqueue_job(function, **kwargs)
    assert job is not None  # random job ids never collide
    return job.job_id


async def project(pool: ArqRedis, function: str, kwargs: dict[str, Any]) -> str:
    return await enqueue(pool, function, **kwargs)


PRODUCERS: dict[str, tuple[str, Producer]] = {
    "arq": ("ArqRedis.enqueue_job", plain_arq),
    "project": ("app.actions.enqueue, as the API enqueues", project),
}
