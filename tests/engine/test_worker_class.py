"""The engine is this project's worker class, not a patch of arq: a plain arq Worker in the same
process (another queue, a user's own functions) behaves as arq documents."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import arq.cli
import arq.worker
import pytest
from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus

from asyncjobs.arqcompat import in_progress_key_prefix
from asyncjobs.redis import redis_settings
from asyncjobs.settings import Settings
from jobs.engine.queue import enqueue_job
from jobs.engine.worker import EngineWorker
from tests.conftest import start_worker, stop_worker
from tests.helpers import wait_for
from tests.servers import SiteStats

PLAIN_QUEUE = "plain:queue"
PLAIN_JOB_TIMEOUT_S = 60
RELEASE: dict[str, asyncio.Event] = {}  # made in the test's own event loop


async def wait_for_release(ctx: dict[str, Any]) -> str:
    await RELEASE["event"].wait()
    return "released"


def plain_settings(settings: Settings) -> dict[str, Any]:
    """A user's own arq settings: their function, their queue, arq's defaults otherwise."""
    return {
        "functions": [wait_for_release],
        "queue_name": PLAIN_QUEUE,
        "redis_settings": redis_settings(settings),
        "job_timeout": PLAIN_JOB_TIMEOUT_S,
        "handle_signals": False,
        "poll_delay": 0.05,
    }


def test_arq_cli_builds_our_worker_for_our_settings_only() -> None:
    import worker_settings  # what `arq worker_settings.WorkerSettings` imports first

    # arq's CLI calls these two names (run_worker goes through arq.worker.create_worker)
    for create in (arq.worker.create_worker, arq.cli.create_worker):  # type: ignore[attr-defined]
        ours = create(worker_settings.WorkerSettings, handle_signals=False)
        plain = create({"functions": [wait_for_release], "handle_signals": False})
        assert type(ours) is EngineWorker
        assert type(plain) is arq.worker.Worker
        assert plain.in_progress_timeout_s == 300 + 10  # arq's default job_timeout + 10 s
        assert ours.in_progress_timeout_s == Settings().job_lease_seconds


async def test_a_plain_arq_worker_beside_ours_keeps_arq_behaviour(
    settings: Settings,
    redis: ArqRedis,
    site: tuple[str, SiteStats],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Both workers in one event loop, each running a job: ours holds its job under a 15 s
    lease, the plain one under arq's job_timeout + 10 s, through arq's own poll loop and
    run_job (whose INFO line names the job)."""
    caplog.set_level(logging.INFO, logger="arq.worker")
    released = RELEASE["event"] = asyncio.Event()
    ours, ours_task = await start_worker(settings, cron_jobs=[])
    plain = arq.worker.Worker(**plain_settings(settings))
    plain_task = asyncio.create_task(plain.main())
    try:
        assert type(plain)._poll_iteration is arq.worker.Worker._poll_iteration
        assert plain.poll_delay_s == 0.05  # arq's poll loop sleeps it; ours waits on wake-ups
        plain_job = await redis.enqueue_job("wait_for_release", _queue_name=PLAIN_QUEUE)
        assert plain_job is not None
        base, stats = site
        our_job_id = await enqueue_job(redis, "scrape", target={"url": f"{base}/slow?ms=1500"})
        assert our_job_id is not None

        async def both_running() -> tuple[int, int] | None:
            plain_ttl = await redis.pttl(in_progress_key_prefix + plain_job.job_id)
            our_ttl = await redis.pttl(in_progress_key_prefix + our_job_id)
            return (plain_ttl, our_ttl) if plain_ttl > 0 and our_ttl > 0 else None

        plain_ttl, our_ttl = await wait_for(both_running, what="both jobs in progress")
        assert plain_ttl > (PLAIN_JOB_TIMEOUT_S + 10 - 5) * 1000  # arq's mark, not our lease
        assert our_ttl <= settings.job_lease_seconds * 1000

        released.set()
        assert await plain_job.result(timeout=15) == "released"
        our_job = Job(our_job_id, redis)

        async def ours_done() -> bool:
            return await our_job.status() == JobStatus.complete

        await wait_for(ours_done, what="our worker's scrape")
        assert plain.jobs_complete == 1 and ours.jobs_complete == 1
        assert stats.hits["/slow"] == 1
        arq_lines = [r.getMessage() for r in caplog.records if r.name == "arq.worker"]
        assert any(f"{plain_job.job_id}:wait_for_release()" in line for line in arq_lines)
    finally:
        released.set()
        plain_task.cancel()
        await asyncio.gather(plain_task, return_exceptions=True)
        await plain.close()
        await stop_worker(ours, ours_task)
