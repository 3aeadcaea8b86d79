"""A user's own jobs for the bench, declared with `@job` as a project declares them and loaded
by the asyncjobs worker through JOB_MODULES=bench.userjobs; the arq engines run the same
bodies as plain arq functions (`ARQ_FUNCTIONS`), Celery as tasks (bench/celery_app.py)."""

from __future__ import annotations

from typing import Any, cast

from arq.typing import WorkerCoroutine
from arq.worker import Function, func

from asyncjobs import JobContext, job

USER_NOOP, USER_GET = "user_noop", "user_get"
USER_JOBS = frozenset({USER_NOOP, USER_GET})


@job(name=USER_NOOP)
async def user_noop() -> None:
    """Returns at once: what a user's job costs the engine."""


@job(name=USER_GET, transient=(OSError,))
async def user_get(ctx: JobContext, url: str) -> int:
    """One HTTP GET through the worker's shared session (the bench site's 50 ms page)."""
    return await _get(ctx.http, url)


async def _get(http: Any, url: str) -> int:
    async with http.get(url) as response:
        await response.read()
        status: int = response.status
    if status >= 400:
        raise OSError(f"HTTP {status}")
    return status


async def _arq_noop(ctx: dict[str, Any]) -> None:
    return None


async def _arq_get(ctx: dict[str, Any], url: str) -> int:
    return await _get(ctx["http"], url)


ARQ_FUNCTIONS: list[Function] = [
    func(cast(WorkerCoroutine, _arq_noop), name=USER_NOOP),
    func(cast(WorkerCoroutine, _arq_get), name=USER_GET),
]
