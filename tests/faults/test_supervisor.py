"""`python -m app worker --processes 2` as production runs it: a child SIGKILLed mid-job is
restarted and its jobs run again; SIGTERM stops every child within the grace."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from asyncio.subprocess import STDOUT
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest
from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus

from asyncjobs.keys import WORKER_KEY_PREFIX, WORKERS_KEY
from asyncjobs.settings import Settings
from jobs.engine.queue import enqueue_jobs
from jobs.values import as_text
from tests.faults.procs import service_env
from tests.helpers import wait_for
from tests.servers import SiteStats

GRACE_S = 3
# docs/operations.md: every child stops within SHUTDOWN_GRACE; this much more is allowed for the
# processes' own exit on a loaded machine (measured: 1.1 s in all, and 1.4 s after a SIGKILL)
EXIT_TOLERANCE_S = 2
JOBS = 12


async def start_supervisor(env: dict[str, str], log: IO[bytes]) -> asyncio.subprocess.Process:
    """`python -m app worker --processes 2`, as production starts it; in the log's folder (the
    test's own), where no developer's `.env` is read."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "worker", "--processes", "2",
        cwd=Path(log.name).parent, env=env, stdout=log, stderr=STDOUT,
    )  # fmt: skip


async def live_workers(redis: ArqRedis) -> dict[int, list[str]]:
    """pid -> the jobs it runs, of every worker whose registry entry is fresh."""
    found = {}
    for worker_id in await redis.smembers(WORKERS_KEY):  # type: ignore[misc]
        entry = await redis.hgetall(WORKER_KEY_PREFIX + as_text(worker_id))  # type: ignore[misc]
        if entry:
            found[int(entry[b"pid"])] = json.loads(entry[b"running_jobs"])
    return found


@pytest.mark.slow
@pytest.mark.timeout(330)  # past its own waits (60 + 30 + 60 + 90 + 30 s); the global one is 120 s
async def test_a_killed_child_is_restarted_and_sigterm_stops_all(
    settings: Settings,
    redis: ArqRedis,
    site: tuple[str, SiteStats],
    tmp_path: Path,
    fault_report: Callable[[str], None],
) -> None:
    base, _ = site
    env = service_env(
        redis_url=settings.redis_url, smtp_host="127.0.0.1", smtp_port=settings.smtp_port,
        scrape_allowed_cidrs="127.0.0.0/8", scrape_allowed_ports="*",
        scrape_per_host_concurrency=0, scrape_min_host_delay=0,
        worker_max_jobs=4, job_lease_seconds=3, shutdown_grace=GRACE_S,
        worker_health_interval=1,
    )  # fmt: skip
    log = (tmp_path / "supervisor.log").open("ab")
    supervisor = await start_supervisor(env, log)
    try:
        first = await wait_for(
            lambda: _workers(redis, 2), timeout=60, what="two workers to register"
        )
        calls = [{"target": {"url": f"{base}/slow?ms=1500&n={n}"}} for n in range(JOBS)]
        ids = [i for i in await enqueue_jobs(redis, "scrape", calls) if i]

        async def both_busy() -> dict[int, list[str]] | None:
            workers = await live_workers(redis)
            busy = {pid: jobs for pid, jobs in workers.items() if jobs}
            return busy if len(busy) == 2 else None

        busy = await wait_for(both_busy, timeout=30, what="both workers running jobs")
        victim, its_jobs = next(iter(busy.items()))
        os.kill(victim, signal.SIGKILL)

        async def restarted() -> set[int] | None:
            pids = set(await live_workers(redis)) - {victim}
            return pids if len(pids) == 2 and pids - set(first) else None

        await wait_for(restarted, timeout=60, what="a new worker in the killed one's place")

        async def all_done() -> bool:
            statuses = [await Job(i, redis).status() for i in ids]
            return all(s == JobStatus.complete for s in statuses)

        await wait_for(all_done, timeout=90, interval=0.2, what="every job, re-runs included")
        tries = {i: (await Job(i, redis).result_info()).job_try for i in its_jobs}  # type: ignore[union-attr]
        assert all(t >= 2 for t in tries.values()), tries  # the killed worker's jobs ran again

        calls = [{"target": {"url": f"{base}/slow?ms=500&m={n}"}} for n in range(4)]
        await enqueue_jobs(redis, "scrape", calls)
        await wait_for(lambda: _busy(redis), timeout=30, what="jobs running before SIGTERM")
        started = time.monotonic()
        supervisor.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(supervisor.wait(), GRACE_S + 15)
        stopped_in = time.monotonic() - started
        fault_report(
            f"supervisor, 2 processes: SIGKILLed child (pid {victim}, {len(its_jobs)} jobs) "
            f"restarted, its jobs re-run with tries {sorted(tries.values())}; SIGTERM stopped "
            f"all in {stopped_in:.1f} s (grace {GRACE_S} s), exit {code}"
        )
        assert code == 0 and stopped_in < GRACE_S + EXIT_TOLERANCE_S
        leftovers = [pid for pid in await live_workers(redis) if _alive(pid)]
        assert leftovers == []
    finally:
        if supervisor.returncode is None:
            supervisor.kill()
            await supervisor.wait()
        log.close()


async def _workers(redis: ArqRedis, count: int) -> set[int] | None:
    pids = set(await live_workers(redis))
    return pids if len(pids) >= count else None


async def _busy(redis: ArqRedis) -> bool:
    return any(jobs for jobs in (await live_workers(redis)).values())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as stat:  # a zombie has exited, only not reaped yet
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


@pytest.mark.slow
async def test_children_stop_when_the_supervisor_is_killed(
    settings: Settings, redis: ArqRedis, tmp_path: Path, fault_report: Callable[[str], None]
) -> None:
    """SIGKILL of the supervisor used to leave its workers running and taking jobs (and a
    restart then made four). The kernel now sends each child SIGTERM when it dies."""
    env = service_env(
        redis_url=settings.redis_url, smtp_host="127.0.0.1", smtp_port=settings.smtp_port,
        shutdown_grace=GRACE_S, worker_health_interval=1,
    )  # fmt: skip
    log = (tmp_path / "supervisor.log").open("ab")
    supervisor = await start_supervisor(env, log)
    children: set[int] = set()
    try:
        children = await wait_for(
            lambda: _workers(redis, 2), timeout=60, what="two workers to register"
        )
        supervisor.kill()
        await supervisor.wait()
        killed_at = time.monotonic()

        async def all_gone() -> bool:
            return not any(_alive(pid) for pid in children)

        await wait_for(all_gone, timeout=GRACE_S + 10, what="the children to exit")
        gone_after = time.monotonic() - killed_at
        # each child got SIGTERM from the kernel: it stops within its grace, as above
        assert gone_after < GRACE_S + EXIT_TOLERANCE_S, gone_after
    finally:
        if supervisor.returncode is None:
            supervisor.kill()
            await supervisor.wait()
        for pid in children:  # a failed run leaves no worker behind for the next tests
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        log.close()
    fault_report(f"supervisor SIGKILLed: its 2 children exited {gone_after:.1f} s later")
