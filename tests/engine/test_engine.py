"""The worker engine (jobs/engine/runner.py) with real workers: leases, shared queues, results."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import cast

import pytest
from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus
from arq.typing import WorkerCoroutine
from arq.worker import func

from asyncjobs.errors import Postpone
from asyncjobs.keys import COUNTERS_KEY
from asyncjobs.settings import Settings
from jobs.context import WorkerContext
from jobs.engine.queue import enqueue_job
from jobs.retry import classified
from tests.conftest import start_worker, stop_worker
from tests.helpers import wait_for
from tests.servers import SiteStats


@pytest.mark.slow
async def test_a_job_longer_than_its_lease_is_not_taken_by_another_worker(
    make_settings: Callable[..., Settings], redis: ArqRedis, site: tuple[str, SiteStats]
) -> None:
    """A 4.5 s page with a 3 s lease: the running worker renews the lease every second, so the
    idle second worker never starts the job again (the page is fetched once)."""
    base, stats = site
    settings = make_settings(job_lease_seconds=3, scrape_timeout=10)
    workers = [await start_worker(settings), await start_worker(settings)]
    try:
        url = f"{base}/slow?ms=4500"
        job_id = await enqueue_job(redis, "scrape", target={"url": url})
        assert job_id is not None
        job = Job(job_id, redis)

        async def finished() -> bool:
            return await job.status() == JobStatus.complete

        await wait_for(finished, timeout=30, interval=0.1, what="the slow scrape")
        info = await job.result_info()
        assert info is not None and info.success and info.job_try == 1
        assert stats.hits["/slow"] == 1
    finally:
        for worker, task in workers:
            await stop_worker(worker, task)


async def test_two_workers_share_a_backlog_and_run_each_job_once(
    make_settings: Callable[..., Settings], redis: ArqRedis, site: tuple[str, SiteStats]
) -> None:
    """100 pages of 200 ms queued before two workers of 20 slots start: neither can hold the
    whole backlog, both take part, and every page is fetched once."""
    base, stats = site
    ids = [
        await enqueue_job(redis, "scrape", target={"url": f"{base}/slow?ms=200&n={n}"})
        for n in range(100)
    ]
    settings = make_settings(worker_max_jobs=20)
    # no cron jobs, so that jobs_complete counts the scrapes only
    workers = [await start_worker(settings, cron_jobs=[]) for _ in range(2)]
    try:

        async def all_complete() -> bool:
            return all([await Job(str(i), redis).status() == JobStatus.complete for i in ids])

        await wait_for(all_complete, timeout=60, interval=0.2, what="100 scrapes")
        results = [await Job(str(i), redis).result_info() for i in ids]
        assert all(r is not None and r.success and r.job_try == 1 for r in results)
        assert stats.hits["/slow"] == 100
        done = [worker.jobs_complete for worker, _ in workers]
        assert sum(done) == 100 and min(done) > 0, done
    finally:
        for worker, task in workers:
            await stop_worker(worker, task)


async def test_jobs_from_plain_arq_producers_are_picked_up_by_polling(
    make_settings: Callable[..., Settings], redis: ArqRedis, site: tuple[str, SiteStats]
) -> None:
    """arq's own enqueue_job pushes no wake-up: the worker still finds its jobs at its next poll
    (every 0.1 s, production's poll_delay); the bound is loose, the machine is shared."""
    base, stats = site
    worker, task = await start_worker(make_settings(), poll_delay=0.1, cron_jobs=[])
    try:
        for n in range(5):
            job = await redis.enqueue_job("scrape", target={"url": f"{base}/page/{n}"})
            assert job is not None

            async def done(job: Job = job) -> bool:
                return await job.status() == JobStatus.complete

            await wait_for(done, timeout=10, interval=0.01, what="a plain arq job")
            info = await job.result_info()
            assert info is not None and info.success
            assert (info.start_time - info.enqueue_time).total_seconds() < 1.0
        assert sum(stats.hits.get(f"/page/{n}", 0) for n in range(5)) == 5
    finally:
        await stop_worker(worker, task)


RUNS: dict[str, list[float]] = {}  # job id -> when each run of `postpones` started
POSTPONEMENTS = 5  # more than the family's 3 tries: postponed runs must not count as tries


@classified("scrape")
async def postpones(ctx: WorkerContext, delay: float) -> int:
    """Postpones itself POSTPONEMENTS times, then returns its try number."""
    runs = RUNS.setdefault(ctx.job_id, [])
    runs.append(time.monotonic())
    if len(runs) <= POSTPONEMENTS:
        raise Postpone(delay, "not yet")
    return int(ctx.job_try)


async def test_a_postponed_job_runs_again_later_without_counting_a_try(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    settings = make_settings()
    worker, task = await start_worker(
        settings, functions=[func(cast(WorkerCoroutine, postpones))], cron_jobs=[]
    )
    try:
        job_id = await enqueue_job(redis, "postpones", delay=0.2)
        assert job_id is not None
        job = Job(job_id, redis)

        async def finished() -> bool:
            return await job.status() == JobStatus.complete

        await wait_for(finished, timeout=30, interval=0.05, what="the postponed job")
        info = await job.result_info()
        assert info is not None and info.success and info.result == 1 and info.job_try == 1
        runs = RUNS[job_id]
        assert len(runs) == POSTPONEMENTS + 1
        assert min(b - a for a, b in itertools.pairwise(runs)) >= 0.19  # not before

        async def counted() -> bool:
            count = await redis.hget(COUNTERS_KEY, "postponed|postpones")  # type: ignore[misc]
            return bool(count == str(POSTPONEMENTS).encode())

        await wait_for(counted, timeout=10, what="the monitor's count of postponed runs")
        assert worker.jobs_retried == 0
    finally:
        await stop_worker(worker, task)
