"""The batch-callback row (issue 31): a batch of 1,000 no-op jobs with one callback job, run by
`python -m bench jobs` for each asyncjobs engine that has the feature (jobs/engine/dependencies.py).

One fresh worker per engine; then, per round, the same 1,000 no-op jobs twice, enqueued as
`POST /batches` enqueues them (one pipelined `enqueue_many` with the batch's job ids): once with a
callback (`enqueue_callback`: a no-op job whose `batch` argument gets the counts) and once without,
in Thue-Morse order (`thue_morse`) so that neither kind keeps the same place. Per batch:

- drain: from just before the enqueue to the callback's finish (with) or the last job's finish
  (without), both finish times from arq's result records;
- the callback's latency: its start time minus the latest finish time of the batch's jobs (arq's
  result records, ms resolution): the worker's batched finish write, finish.lua releasing the
  callback, the wake-up, the claim and the hand-off read;
- the worker's CPU, Redis's CPU and the Redis commands (the producer's included, the bench's
  polling left out) per job: what the dependency bookkeeping adds per job shows as the ratio of
  the two variants in the same run.

Each callback is checked: it ran once (`job_try` 1, success) and was handed the counts.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.jobs import JobResult, deserialize_result

from app.actions import enqueue_many
from asyncjobs.arqcompat import result_key_prefix
from bench.engines import ASYNCJOBS_SETTINGS, Engine, Services, checkout
from bench.procstat import TreeSampler, cpu_seconds
from bench.runner import wait_ready
from bench.services import BenchError, RedisServer
from bench.stats import percentile
from jobs.engine.dependencies import FollowUp, enqueue_callback

BATCH_JOBS = 1000
ROUNDS = {"full": 10, "quick": 2}  # each round: one batch with a callback, one without
WARM_UP_JOBS = 100  # one untimed batch with a callback first (scripts loaded, pool warm)
JOB_FUNCTION = "noop"  # bench.asyncjobs_settings's no-op job, also the callback
CALLBACK_ARGUMENT = "batch"  # the callback's argument that gets {batch_id, total, counts}
DEADLINE_S = 60.0  # per batch
POLL_EVERY_S = 0.05  # the bench's own completion polling (left out of the Redis counts)
SETTLE_S = 0.2  # between batches: the worker idle again
KEYS_PER_COMMAND = 1000
FEATURE_FILE = "jobs/engine/dependencies.py"


@dataclass
class BatchRound:
    """One batch of `n` jobs, with a callback or without."""

    callback: bool
    n: int
    drain_s: float | None = None  # enqueue -> callback's finish (or the last job's)
    latency_ms: float | None = None  # callback's start - the batch's latest finish
    completed: int = 0  # the batch's jobs with a result record
    failed: int = 0
    counts: dict[str, int] | None = None  # what the callback was handed
    callback_try: int | None = None  # the callback's job_try (1: it ran once)
    worker_cpu_s: float | None = None  # the worker's process tree, enqueue to the end
    redis_cpu_s: float | None = None  # redis-server's (the bench's polling included)
    redis_commands: dict[str, int] = field(default_factory=dict)  # scripts' calls included


@dataclass
class BatchCallbackResult:
    engine: str
    n: int
    status: str = "ok"  # ok, timeout, error or skipped
    error: str | None = None
    rounds: list[BatchRound] = field(default_factory=list)


def has_batch_callback(engine: Engine) -> bool:
    """An asyncjobs worker whose code has batch callbacks (today's, or a commit's that has)."""
    if engine.kind != "arq" or engine.target != ASYNCJOBS_SETTINGS:
        return False
    if engine.revision is None:
        return True
    return (checkout(engine.revision) / FEATURE_FILE).is_file()


def thue_morse(k: int) -> bool:
    """Whether batch `k` has a callback: False, True, True, False, True, False, False, True...
    (the Thue-Morse sequence), so that neither kind keeps falling on the same phase of a
    periodic cost of the worker's (here every 4th batch drains slower, whichever kind it is:
    with plain alternation all of them were batches without a callback)."""
    return bin(k).count("1") % 2 == 1


def skipped_batch_callback(engine: Engine) -> BatchCallbackResult:
    return BatchCallbackResult(
        engine.name, BATCH_JOBS, "skipped", f"no {FEATURE_FILE} in this worker's code"
    )


async def measure_batch_callback(
    engine: Engine, services: Services, redis: RedisServer, rounds: int, n: int = BATCH_JOBS
) -> BatchCallbackResult:
    result = BatchCallbackResult(engine.name, n)
    await redis.reset()
    worker = engine.start(services, services.folder / f"{engine.name}-batch-callback.log")
    pool: ArqRedis = await create_pool(RedisSettings.from_dsn(services.redis_url))
    try:
        await wait_ready(engine, services, worker)
        await run_batch(pool, services, redis, worker.pid, WARM_UP_JOBS, callback=True)
        for k in range(2 * rounds):
            callback = thue_morse(k)
            await asyncio.sleep(SETTLE_S)
            done = await run_batch(pool, services, redis, worker.pid, n, callback=callback)
            result.rounds.append(done)
            if done.drain_s is None:
                result.status = "timeout"
                return result
            if worker.exited() is not None:
                raise BenchError(f"{engine.name} worker died:\n{worker.log_tail()}")
    except BenchError as exc:
        result.status, result.error = "error", str(exc)
    except Exception as exc:  # a bug in the bench or the engine: report it, run the others
        result.status, result.error = "error", "".join(traceback.format_exception(exc)[-3:])
    finally:
        await pool.aclose(close_connection_pool=True)
        await worker.stop()
    return result


async def run_batch(
    pool: ArqRedis, services: Services, redis: RedisServer, worker_pid: int, n: int, callback: bool
) -> BatchRound:
    """One batch, enqueued as `POST /batches` does; measured as the module's docstring says."""
    done = BatchRound(callback, n)
    batch_id = uuid4().hex
    ids = [f"{batch_id}-{i}" for i in range(n)]
    calls: list[dict[str, Any]] = [{"_job_id": job_id} for job_id in ids]
    sampler = TreeSampler(worker_pid)
    redis_pid = services.server_pids.get("redis")
    redis_cpu = cpu_seconds(redis_pid) if redis_pid else None
    before = await redis.command_calls()
    sampler.start()
    began = time.time()
    await enqueue_many(pool, JOB_FUNCTION, calls)
    callback_id = None
    if callback:
        follow = FollowUp(JOB_FUNCTION, {}, argument=CALLBACK_ARGUMENT)
        callback_id = await enqueue_callback(pool, batch_id, ids, follow)
    # the same polling load with or without a callback: every job's result key is polled
    watched = [*ids, callback_id] if callback_id else ids
    own: Counter[str] = Counter()
    finished = await wait_for_results(services, watched, own)
    after = await redis.command_calls()
    _, worker_cpu = await sampler.stop()
    redis_cpu_after = cpu_seconds(redis_pid) if redis_pid else None
    done.worker_cpu_s = worker_cpu
    if redis_cpu is not None and redis_cpu_after is not None:
        done.redis_cpu_s = redis_cpu_after - redis_cpu
    calls_made = Counter(after)
    calls_made.subtract(before)
    calls_made.subtract(own)
    done.redis_commands = {k: v for k, v in calls_made.most_common() if v > 0}
    records = await read_results(services, ids)
    done.completed = len(records)
    done.failed = sum(not r.success for r in records)
    if not finished:
        return done
    last_finish = max(r.finish_time.timestamp() for r in records)
    if callback_id is None:
        done.drain_s = last_finish - began
        return done
    [record] = await read_results(services, [callback_id])
    done.drain_s = record.finish_time.timestamp() - began
    done.latency_ms = (record.start_time.timestamp() - last_finish) * 1000
    done.callback_try = record.job_try
    handed = record.kwargs.get(CALLBACK_ARGUMENT)
    if record.success and isinstance(handed, dict):
        done.counts = {k: v for k, v in handed.get("counts", {}).items() if v}
    return done


async def wait_for_results(services: Services, job_ids: list[str], own: Counter[str]) -> bool:
    """Poll until every job has a result record (True) or the deadline passes (False)."""
    keys = [result_key_prefix + job_id for job_id in job_ids]
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        found = 0
        for i in range(0, len(keys), KEYS_PER_COMMAND):
            found += int(await services.redis.exists(*keys[i : i + KEYS_PER_COMMAND]))
            own["exists"] += 1
        if found == len(keys):
            return True
        await asyncio.sleep(POLL_EVERY_S)
    return False


async def read_results(services: Services, job_ids: list[str]) -> list[JobResult]:
    keys = [result_key_prefix + job_id for job_id in job_ids]
    records: list[JobResult] = []
    for i in range(0, len(keys), KEYS_PER_COMMAND):
        for value in await services.redis.mget(keys[i : i + KEYS_PER_COMMAND]):
            if value is not None:
                records.append(deserialize_result(value))
    return records


def summary(result: BatchCallbackResult) -> dict[str, float | None]:
    """The callback's latency (p50, max) and the drain (p50) over the batches; CPU and Redis
    commands per job summed over all batches of a kind (the CPU clock ticks every 10 ms: one
    batch's few tens of ms are too coarse to compare alone). `_with`: batches with a callback,
    `_without`: the same jobs without."""
    latencies = [r.latency_ms for r in result.rounds if r.latency_ms is not None]
    figures: dict[str, float | None] = {
        "latency_p50_ms": percentile(latencies, 50) if latencies else None,
        "latency_max_ms": max(latencies) if latencies else None,
    }
    for suffix, callback in (("with", True), ("without", False)):
        rounds = [r for r in result.rounds if r.callback == callback and r.drain_s is not None]
        jobs = sum(r.n for r in rounds)
        drains = [r.drain_s for r in rounds if r.drain_s is not None]
        worker = [r.worker_cpu_s for r in rounds if r.worker_cpu_s is not None]
        redis = [r.redis_cpu_s for r in rounds if r.redis_cpu_s is not None]
        figures[f"drain_s_{suffix}"] = percentile(drains, 50) if drains else None
        figures[f"worker_cpu_ms_per_job_{suffix}"] = sum(worker) / jobs * 1000 if jobs else None
        figures[f"redis_cpu_ms_per_job_{suffix}"] = (
            sum(redis) / jobs * 1000 if jobs and len(redis) == len(rounds) else None
        )
        commands = sum(sum(r.redis_commands.values()) for r in rounds)
        figures[f"redis_cmds_per_job_{suffix}"] = commands / jobs if jobs else None
    return figures
