"""The engine is this project's worker class, not a patch of arq: a plain arq Worker in the same
process (another queue, a user's own functions) behaves as arq documents."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import arq.worker
import pytest
from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus

from asyncjobs.arqcompat import in_progress_key_prefix
from asyncjobs.redis import redis_settings
from asyncjobs.settings import Settings
from jobs.engine.queue import enqueue_job
from tests.conftest import TEST_REDIS_URL, start_worker, stop_worker
from tests.faults.procs import service_env
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


# What worker_settings changes in the process that imports it, printed as JSON: run both by a
# plain import and by arq's CLI (its `run_worker` swapped for this probe, so nothing runs).
PROBE = """
import asyncio, json, logging, sys
import arq.cli, arq.worker
from arq.worker import func

async def noop(ctx):
    return None

def state():
    return {
        "create_worker": [f.__module__ for f in (arq.worker.create_worker, arq.cli.create_worker)],
        "log_config": arq.cli.default_log_config.__module__,
        "policy": type(asyncio.get_event_loop_policy()).__module__.split(".")[0],
        "root_handlers": len(logging.getLogger().handlers),
    }

def probe(settings_cls, **kwargs):  # arq's CLI calls run_worker(settings) once set up
    plain_settings = {"functions": [func(noop, name="noop")], "handle_signals": False}
    built = {}
    for name, create in [("run", arq.worker.create_worker), ("watch", arq.cli.create_worker)]:
        ours = create(settings_cls, handle_signals=False)
        plain = create(plain_settings)
        built[name] = [
            type(ours).__name__, ours.in_progress_timeout_s, type(ours.loop).__module__,
            type(plain).__name__, plain.in_progress_timeout_s,
        ]
    print(json.dumps({"state": state(), "built": built}))

before = state()
if sys.argv[1] == "import":
    import worker_settings
    print(json.dumps({"before": before, "state": state()}))
else:
    arq.cli.run_worker = probe
    arq.cli.cli(["worker_settings.WorkerSettings"], standalone_mode=False)
"""


def probe(how: str, folder: Path) -> dict[str, Any]:
    """PROBE run in `folder` (the test's own: no developer's `.env` there)."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, how], cwd=folder, env=service_env(redis_url=TEST_REDIS_URL),
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_importing_the_entry_point_changes_nothing_else(tmp_path: Path) -> None:
    """Tests, the app or a user's script may import worker_settings: arq stays arq, the event
    loop and logging stay as they were."""
    seen = probe("import", tmp_path)
    assert seen["state"] == seen["before"]
    assert seen["state"]["create_worker"] == ["arq.worker", "arq.worker"]
    assert seen["state"]["policy"] == "asyncio"


def test_arq_cli_builds_our_worker_for_our_settings_only(tmp_path: Path) -> None:
    """arq's CLI, which names create_worker twice (run_worker's and --watch's), builds our
    class for our settings and arq's for any other, on uvloop, logging with our config."""
    seen = probe("cli", tmp_path)
    assert seen["state"]["create_worker"] == ["asyncjobs.arqcompat", "asyncjobs.arqcompat"]
    assert seen["state"]["log_config"] == "asyncjobs.logs"
    assert seen["state"]["policy"] == "uvloop"
    lease = Settings().job_lease_seconds
    plain_mark = 300 + 10  # arq's default job_timeout + 10 s
    for path in ("run", "watch"):
        assert seen["built"][path] == ["EngineWorker", lease, "uvloop", "Worker", plain_mark]


@pytest.mark.slow
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
        assert type(plain)._poll_iteration is arq.worker.Worker._poll_iteration  # arq's own loop
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
