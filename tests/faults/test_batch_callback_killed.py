"""kill -9 of worker processes at several moments in a batch of 1,000 jobs with a callback: the
callback runs exactly once, after the last job, with the counts of all 1,000 (issue 31).

Releasing a waiting job is part of its parent's finish script (jobs/engine/lua/finish.lua), so a
kill leaves a parent either unfinished (its lease ends, it runs again, and that finish releases)
or finished and released: the callback's pending count reaches 0 once. The callback job counts
its own runs in Redis; the kills happen while the batch's jobs run, never during the callback.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from arq.connections import ArqRedis

from jobs.engine.dependencies import FollowUp, enqueue_callback
from jobs.engine.queue import enqueue_jobs
from tests.conftest import TEST_REDIS_URL
from tests.faults.procs import start_worker_process, stop_process
from tests.helpers import wait_for

TOTAL = 1000
MODULE = """
import asyncio
import json

from asyncjobs import JobContext, job


@job
async def batch_step(ctx: JobContext, n: int) -> int:
    await ctx.redis.incr("test:starts")  # a run a kill cuts short is counted here only
    await asyncio.sleep(0.02)  # long enough for a kill to catch jobs in flight
    await ctx.redis.incr("test:steps")
    return n


@job
async def batch_done(ctx: JobContext, batch: dict) -> None:
    await ctx.redis.incr("test:callback-runs")
    await ctx.redis.set("test:callback-batch", json.dumps(batch))
"""


async def kill_at(redis: ArqRedis, steps: int, worker: asyncio.subprocess.Process) -> int:
    """SIGKILL `worker` once `steps` of the batch's job runs have ended; the steps then."""

    async def reached() -> bool:
        return int(await redis.get("test:steps") or 0) >= steps

    await wait_for(reached, timeout=120, interval=0.002, what=f"{steps} job runs")
    os.kill(worker.pid, signal.SIGKILL)
    await worker.wait()
    return int(await redis.get("test:steps") or 0)


@pytest.mark.timeout(300)
@pytest.mark.slow
async def test_kill_9_mid_batch_runs_the_callback_exactly_once(
    redis: ArqRedis, tmp_path: Path, fault_report: Callable[[str], None]
) -> None:
    (tmp_path / "batchtasks.py").write_text(textwrap.dedent(MODULE))
    env = {
        "redis_url": TEST_REDIS_URL,
        "job_modules": "batchtasks",
        "worker_max_jobs": 50,
        "job_lease_seconds": 3,  # a killed worker's jobs run again 3 s after the kill
    }
    log = tmp_path / "workers.log"
    ids = [f"kb-{n}" for n in range(TOTAL)]
    await enqueue_jobs(redis, "batch_step", [{"n": n, "_job_id": i} for n, i in enumerate(ids)])
    await enqueue_callback(redis, "kb", ids, FollowUp("batch_done", {}, argument="batch"))
    workers = [await start_worker_process(log, **env) for _ in range(2)]
    kills = []
    try:
        for n, steps in enumerate((1, 350, 700)):  # early, a third in, two thirds in
            victim = workers[n % 2]
            kills.append(await kill_at(redis, steps, victim))
            workers[n % 2] = await start_worker_process(log, **env)

        async def called_back() -> bool:
            return bool(await redis.exists("test:callback-batch"))

        await wait_for(called_back, timeout=120, what=f"the callback; see {log}")
        done_at = time.monotonic()
        await asyncio.sleep(4)  # past a lease: a second release would have run it again
        runs = int(await redis.get("test:callback-runs") or 0)
        steps = int(await redis.get("test:steps") or 0)
        starts = int(await redis.get("test:starts") or 0)
    finally:
        for worker in workers:
            await stop_process(worker)
    batch = json.loads(await redis.get("test:callback-batch"))
    fault_report(
        f"batch callback, kill -9 at {kills} job runs: callback runs={runs}, "
        f"job runs={steps} ended and {starts} started for {TOTAL} jobs ({starts - TOTAL} "
        f"started again), counts={batch['counts']}"
    )
    assert done_at and runs == 1
    assert batch["total"] == TOTAL
    assert batch["counts"] == {"complete": TOTAL, "failed": 0, "aborted": 0}
    assert starts > TOTAL, "the kills interrupted no job: the test proved nothing"
