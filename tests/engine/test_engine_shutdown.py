"""Closing a worker at the awkward moments: while its finishes are being written, while a
claim is in flight, and right after a claim, before the claimed jobs' tasks have run.

Redis's own `CLIENT PAUSE WRITE` holds the worker's scripts inside Redis, so each moment is
reached on purpose, not by timing. Each test fails on the engine as it was before its close
was fixed (CancelledError out of `close()`, jobs left hidden for their lease).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus
from arq.worker import func
from redis.asyncio import Redis

import jobs.engine.queue
import jobs.engine.runner
from asyncjobs.arqcompat import in_progress_key_prefix, timestamp_ms
from asyncjobs.settings import Settings
from jobs.engine.queue import Claimed, enqueue_job
from jobs.engine.runner import Engine
from tests.conftest import TEST_REDIS_URL, start_worker, stop_worker
from tests.helpers import wait_for

JOBS = 20


@pytest.fixture
async def pause_writes() -> AsyncIterator[Callable[[int], Any]]:
    """`await pause(ms)`: Redis holds every write (scripts included) for ms or until the test
    ends. A client of its own: CLIENT PAUSE does not hold the client that sent it."""
    admin = Redis.from_url(TEST_REDIS_URL)

    async def pause(ms: int) -> None:
        await admin.execute_command("CLIENT", "PAUSE", ms, "WRITE")

    try:
        yield pause
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()


async def unpause() -> None:
    admin = Redis.from_url(TEST_REDIS_URL)
    try:
        await admin.execute_command("CLIENT", "UNPAUSE")
    finally:
        await admin.aclose()


def gated_worker_options(gate: asyncio.Event) -> dict[str, Any]:
    async def gated(ctx: dict[str, Any]) -> str:
        await gate.wait()
        return "done"

    return {"functions": [func(gated, name="gated")], "cron_jobs": []}


def engine_tasks() -> list[asyncio.Task[Any]]:
    """Tasks of the engine still pending: job runners and the finish writer."""
    names = ("run_claimed", "_flush")
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done() and getattr(t.get_coro(), "__name__", "") in names
    ]


async def assert_all_due_again(redis: ArqRedis, ids: list[str]) -> None:
    """Handed back at once: due now (not hidden until a lease ends), not marked running."""
    now = timestamp_ms()
    for job_id in ids:
        score = await redis.zscore("arq:queue", job_id)
        assert score is not None and score <= now, (job_id, score, now)
        assert not await redis.exists(in_progress_key_prefix + job_id), job_id


async def test_close_while_finishes_are_being_written(
    settings: Settings, redis: ArqRedis, pause_writes: Callable[[int], Any]
) -> None:
    """The poll loop has stopped; the jobs end and their finishes wait inside Redis when
    close() cancels their tasks (arq's close cancels every task it has)."""
    gate = asyncio.Event()
    worker, task = await start_worker(settings, **gated_worker_options(gate))
    closing: asyncio.Task[None] | None = None
    try:
        ids = [str(await enqueue_job(redis, "gated")) for _ in range(JOBS)]

        async def all_running() -> bool:
            return len(worker.job_tasks) == JOBS

        await wait_for(all_running, what="every job running")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pause_writes(10_000)
        gate.set()

        async def finishes_in_redis() -> bool:  # every job ended, its end held by the pause
            waiting = [t for t in worker.tasks.values() if not t.done()]
            return not worker.job_tasks and len(waiting) == JOBS

        await wait_for(finishes_in_redis, what="the finishes held inside Redis")
        closing = asyncio.create_task(worker.close())

        async def cancelled() -> bool:  # close() has cancelled every job task
            return all(t.cancelling() or t.done() for t in worker.tasks.values())

        await wait_for(cancelled, what="close() cancelling the job tasks")
        await unpause()
        await asyncio.wait_for(closing, 10)  # raised CancelledError before the fix
    finally:
        if closing is None:
            await stop_worker(worker, task)
    for job_id in ids:
        assert await Job(job_id, redis).status() == JobStatus.complete, job_id
    assert await redis.zcard("arq:queue") == 0
    assert engine_tasks() == []
    assert worker._pool is None  # close() ran to its end: the shutdown hook and the pool


async def test_close_while_a_claim_is_in_flight(
    settings: Settings,
    redis: ArqRedis,
    pause_writes: Callable[[int], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker is stopped while its claim script waits inside Redis: what the claim took
    is handed back as soon as it returns, instead of staying hidden for a lease."""
    claiming, paused = asyncio.Event(), asyncio.Event()
    real_claim = jobs.engine.queue.claim

    async def claim_spy(*args: Any) -> Any:
        if args[2] > 0 and not claiming.is_set():  # the first claim that can take jobs
            claiming.set()
            await paused.wait()  # sent once Redis holds writes
        return await real_claim(*args)

    monkeypatch.setattr(jobs.engine.runner, "claim", claim_spy)
    worker, task = await start_worker(settings, **gated_worker_options(asyncio.Event()))
    stopping: asyncio.Task[None] | None = None
    try:
        worker.allow_pick_jobs = False  # no job is claimed before the pause
        ids = [str(await enqueue_job(redis, "gated")) for _ in range(JOBS)]
        worker.allow_pick_jobs = True
        await asyncio.wait_for(claiming.wait(), 10)
        await pause_writes(10_000)
        paused.set()
        stopping = asyncio.create_task(stop_worker(worker, task))

        async def main_task_cancelled() -> bool:
            return task.cancelling() > 0 or task.done()

        await wait_for(main_task_cancelled, what="the poll loop cancelled")
        await unpause()
        await asyncio.wait_for(stopping, 10)
    finally:
        if stopping is None:
            await stop_worker(worker, task)
    await assert_all_due_again(redis, ids)
    assert worker.jobs_complete == 0
    assert engine_tasks() == []


async def test_close_right_after_a_claim_before_the_jobs_ran(
    settings: Settings, redis: ArqRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every claimed job's task is cancelled before its first step, as arq's signal handler
    does when a stop comes right after a poll: close() ends cleanly and the jobs are due
    again at once, not when their leases end."""
    real_start = Engine._start
    started: list[str] = []

    def start_then_stop(self: Engine, job: Claimed) -> None:
        real_start(self, job)
        started.append(job.job_id)
        self.worker.allow_pick_jobs = False
        self.worker.tasks[job.job_id].cancel()

    monkeypatch.setattr(Engine, "_start", start_then_stop)
    ids = [str(await enqueue_job(redis, "gated")) for _ in range(JOBS)]
    worker, task = await start_worker(settings, **gated_worker_options(asyncio.Event()))
    try:

        async def handed_back() -> bool:
            return len(started) == JOBS and not worker.tasks and not engine_tasks()

        await wait_for(handed_back, what="the cancelled tasks to end and hand their jobs back")
        await assert_all_due_again(redis, ids)
    finally:
        await asyncio.wait_for(stop_worker(worker, task), 10)
    assert worker.jobs_complete == 0 and worker._pool is None
