"""One engine through one workload: fresh Redis state, a fresh worker, enqueue, wait, measure.

Per run: FLUSHALL + CONFIG RESETSTAT, start the worker and wait until it is ready, then (from
here on measured) enqueue all N jobs, wait for all N completions or the deadline, read Redis
command counts, the worker tree's CPU and peak RSS, and every job's enqueue/start/finish time.
On the no-op workload the idle worker then also gets the pickup test: 50 jobs, 20 ms apart.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

from bench.engines import Batch, Engine, Services, Timing
from bench.procstat import TreeSampler, cpu_seconds
from bench.profile import Profiler
from bench.services import BenchError, ChildProcess, RedisServer
from bench.stats import percentile
from bench.workloads import SITE_WORKLOADS, Workload

READY_TIMEOUT_S = 60.0
POLL_EVERY_S = 0.05
PICKUP_JOBS = 50
PICKUP_INTERVAL_S = 0.02


@dataclass
class RunResult:
    engine: str
    workload: str
    n: int
    concurrency: int
    status: str = "ok"  # ok, timeout or error
    error: str | None = None
    completed: int = 0  # jobs that finished (ok or failed)
    failed: int = 0
    delivered: int | None = None  # pages the site served / messages the sink accepted
    peak_in_flight: int | None = None  # scrape, http: most requests the site had in flight
    profile: str | None = None  # --profile: where the worker's CPU went (bench/profile.py)
    enqueue_s: float | None = None
    seconds: float | None = None  # last finish - first enqueue
    jobs_per_s: float | None = None
    start_p50_ms: float | None = None
    start_p99_ms: float | None = None
    finish_p50_ms: float | None = None
    finish_p99_ms: float | None = None
    peak_rss_mb: float | None = None
    cpu_s: float | None = None
    cpu_s_per_1k: float | None = None
    redis_cmds_per_job: float | None = None
    redis_commands: dict[str, int] = field(default_factory=dict)  # per command, whole run
    server_cpu_s: dict[str, float] = field(default_factory=dict)  # redis, site, sink


@dataclass
class PickupResult:
    engine: str
    n: int
    completed: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    error: str | None = None


async def wait_ready(engine: Engine, services: Services, worker: ChildProcess) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not await engine.ready(services, worker):
        if worker.exited() is not None:
            raise BenchError(f"{engine.name} worker exited early:\n{worker.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{engine.name} worker not ready after {READY_TIMEOUT_S:g}s")
        await asyncio.sleep(0.02)


async def wait_done(
    engine: Engine, services: Services, batch: Batch, deadline_s: float, worker: ChildProcess
) -> tuple[int, Counter[str]]:
    """Poll completions until all are in or the deadline passes: (finished, our commands)."""
    own: Counter[str] = Counter()
    command = "hlen" if engine.kind == "celery" else "exists"
    deadline = time.monotonic() + deadline_s
    while True:
        done, calls = await engine.completed(services, batch)
        own[command] += calls
        if done >= batch.n or time.monotonic() > deadline:
            return done, own
        if worker.exited() is not None:
            raise BenchError(f"{engine.name} worker died:\n{worker.log_tail()}")
        await asyncio.sleep(POLL_EVERY_S)


def server_cpu(services: Services) -> dict[str, float]:
    return {
        name: cpu
        for name, pid in services.server_pids.items()
        if (cpu := cpu_seconds(pid)) is not None
    }


def fill_timings(result: RunResult, timings: list[Timing]) -> None:
    if not timings:
        return
    result.completed = len(timings)
    result.failed = sum(not t.ok for t in timings)
    to_start = [(t.started - t.enqueued) * 1000 for t in timings]
    to_finish = [(t.finished - t.enqueued) * 1000 for t in timings]
    result.start_p50_ms, result.start_p99_ms = percentile(to_start, 50), percentile(to_start, 99)
    result.finish_p50_ms, result.finish_p99_ms = (
        percentile(to_finish, 50),
        percentile(to_finish, 99),
    )
    result.seconds = max(t.finished for t in timings) - min(t.enqueued for t in timings)
    if result.status == "ok" and result.seconds > 0:
        result.jobs_per_s = result.n / result.seconds


async def run_workload(
    engine: Engine,
    workload: Workload,
    n: int,
    services: Services,
    redis: RedisServer,
    profile: bool = False,
) -> tuple[RunResult, PickupResult | None]:
    result = RunResult(engine.name, workload.name, n, engine.scrape_concurrency())
    pickup: PickupResult | None = None
    await redis.reset()
    await services.site.reset()
    await services.sink.reset()
    worker = engine.start(services, services.folder / f"{engine.name}-{workload.name}.log")
    try:
        await wait_ready(engine, services, worker)
        sampler = TreeSampler(worker.pid)
        if profile:
            profiler = Profiler(worker.pid, worker.log.with_suffix(".pyspy"))
            await profiler.start()
        before = await redis.command_calls()
        servers_before = server_cpu(services)
        sampler.start()
        batch = await engine.enqueue(services, workload.name, n)
        result.enqueue_s = batch.seconds
        done, own = await wait_done(engine, services, batch, workload.deadline_s(n), worker)
        after = await redis.command_calls()
        result.peak_rss_mb, result.cpu_s = await sampler.stop()
        if profile:
            result.profile = await profiler.stop()
        result.server_cpu_s = {
            name: round(cpu - servers_before.get(name, 0.0), 2)
            for name, cpu in server_cpu(services).items()
        }
        if done < n:
            result.status = "timeout"
        fill_timings(result, await engine.timings(services, batch))
        result.cpu_s_per_1k = result.cpu_s / max(result.completed, 1) * 1000
        calls = Counter(after)
        calls.subtract(before)
        calls.subtract(own)
        result.redis_commands = {k: v for k, v in calls.most_common() if v > 0}
        result.redis_cmds_per_job = sum(result.redis_commands.values()) / n
        if workload.name in SITE_WORKLOADS:
            site = await services.site.stats()
            result.delivered, result.peak_in_flight = site["pages"], site["max_in_flight"]
        elif workload.name == "email":
            result.delivered = await services.sink.messages()
        if workload.name == "noop":
            pickup = await measure_pickup(engine, services, worker)
    except BenchError as exc:
        result.status, result.error = "error", str(exc)
    except Exception as exc:  # a bug in the bench or the engine: report it, run the others
        result.status, result.error = "error", "".join(traceback.format_exception(exc)[-3:])
    finally:
        await worker.stop()
    return result, pickup


async def measure_drain(
    engine: Engine, workload: Workload, n: int, services: Services, redis: RedisServer
) -> RunResult:
    """N jobs queued before the worker starts, then the worker alone: jobs/s from its first
    start to its last finish. What the worker can do, whatever the producer can: with jobs as
    short as a no-op, the enqueueing run above measures the producer."""
    result = RunResult(engine.name, f"{workload.name}-drain", n, engine.scrape_concurrency())
    await redis.reset()
    batch = await engine.enqueue(services, workload.name, n)
    result.enqueue_s = batch.seconds
    worker = engine.start(services, services.folder / f"{engine.name}-{workload.name}-drain.log")
    try:
        done, _ = await wait_done(engine, services, batch, workload.deadline_s(n) + 60, worker)
        if done < n:
            result.status = "timeout"
        timings = await engine.timings(services, batch)
        fill_timings(result, timings)
        if timings:
            result.seconds = max(t.finished for t in timings) - min(t.started for t in timings)
            result.jobs_per_s = n / result.seconds if result.status == "ok" else None
    except BenchError as exc:
        result.status, result.error = "error", str(exc)
    finally:
        await worker.stop()
    return result


async def measure_pickup(engine: Engine, services: Services, worker: ChildProcess) -> PickupResult:
    """An idle worker: PICKUP_JOBS no-op jobs, one every PICKUP_INTERVAL_S; enqueue -> start."""
    pickup = PickupResult(engine.name, PICKUP_JOBS)
    try:
        batch = await engine.enqueue(services, "noop", PICKUP_JOBS, interval=PICKUP_INTERVAL_S)
        await wait_done(engine, services, batch, 30, worker)
        timings = await engine.timings(services, batch)
    except BenchError as exc:
        pickup.error = str(exc)
        return pickup
    latencies = [(t.started - t.enqueued) * 1000 for t in timings]
    pickup.completed = len(latencies)
    if latencies:
        pickup.p50_ms, pickup.p99_ms = percentile(latencies, 50), percentile(latencies, 99)
        pickup.max_ms = max(latencies)
    return pickup
