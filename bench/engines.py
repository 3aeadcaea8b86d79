"""The engines under test and how the bench drives each: start a worker, see it ready, enqueue
a workload, count completions, read every job's enqueue/start/finish times.

arq engines are driven from this process (arq's own `enqueue_job`, arq's own job results);
Celery engines through the Celery venv (`bench.celery_enqueue`) and a Redis hash the tasks write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
from asyncio.subprocess import PIPE
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.jobs import deserialize_result
from redis.asyncio import Redis

from asyncjobs.arqcompat import default_queue_name, health_check_key_suffix, result_key_prefix
from bench.common import CELERY_TIMES_KEY, HTTP_JOBS_SECRET
from bench.producers import PRODUCERS, Producer
from bench.services import (
    CACHE,
    REPO,
    BenchError,
    ChildProcess,
    Sink,
    Site,
    child_env,
    python_module,
)
from bench.workloads import WorkloadName, arq_job

ENQUEUE_BATCH = 100  # enqueue_job calls in flight at once
KEYS_PER_COMMAND = 1000  # result keys per EXISTS / MGET
ASYNCJOBS_SETTINGS = "bench.asyncjobs_settings.WorkerSettings"
HTTP_POOL = 100  # SCRAPE_MAX_CONNECTIONS default: the project's shared aiohttp pool


@dataclass(frozen=True)
class Timing:
    """One job, in unix seconds."""

    enqueued: float
    started: float
    finished: float
    ok: bool


@dataclass
class Services:
    """What every engine run uses: the bench Redis, site and sink, and where logs go."""

    redis_url: str
    redis: Redis
    site: Site
    sink: Sink
    folder: Path
    celery_python: Path | None = None
    celery_producer: CeleryProducer | None = None
    # pid of each server process (redis, site, sink): their CPU is reported beside the worker's
    server_pids: dict[str, int] = field(default_factory=dict)
    page_delay_ms: int | None = None  # None: the site's 50 ms; else slower pages (memory probe)

    def pages_url(self) -> str:
        """Where scrape jobs' pages are: the site, or its slow copy."""
        if self.page_delay_ms is None:
            return self.site.url
        return f"{self.site.url}/slow/{self.page_delay_ms}"


@dataclass
class Batch:
    """What one enqueue call sent: arq job ids, or a Celery times hash and a count."""

    n: int
    seconds: float
    job_ids: list[str]
    times_key: str = CELERY_TIMES_KEY


@dataclass(frozen=True)
class Engine:
    name: str
    kind: Literal["arq", "celery"]
    target: str  # arq: WorkerSettings import path; celery: pool name
    max_jobs: int  # jobs the worker runs at once
    description: str
    celery_concurrency: int | None = None
    http_pool: int = HTTP_POOL  # arq engines: SCRAPE_MAX_CONNECTIONS
    settings: tuple[tuple[str, object], ...] = ()  # arq engines: more environment settings
    processes: int = 1  # arq engines: worker processes (started by bench/workers.py)
    revision: str | None = None  # arq engines: run the worker's code as of this git commit

    def producer(self) -> tuple[str, Producer]:
        """How jobs are enqueued: (description, producer); arq engines only."""
        return PRODUCERS["project" if self.target == ASYNCJOBS_SETTINGS else "arq"]

    def scrape_concurrency(self) -> int:
        """Requests in flight at most: an arq worker's jobs share one aiohttp pool."""
        if self.kind == "arq":
            return min(self.max_jobs, self.http_pool) * self.processes
        return self.max_jobs

    # --- the worker ---------------------------------------------------------------------

    def start(self, services: Services, log: Path) -> ChildProcess:
        if self.kind == "arq":
            settings = arq_env(services) | dict(self.settings)
            if self.revision is not None:  # that commit's code first on the path
                settings.pop("job_modules")  # bench.userjobs may not exist there
            env = child_env(**settings)
            if self.revision is not None:
                env["PYTHONPATH"] = str(checkout(self.revision))
            command = python_module("arq", self.target)
            if self.processes > 1:
                command = python_module("bench.workers", str(self.processes), *command)
        else:
            if services.celery_python is None:
                raise BenchError("the Celery venv is not set up")
            env = child_env(
                BENCH_REDIS_URL=services.redis_url,
                BENCH_SMTP_HOST="127.0.0.1",
                BENCH_SMTP_PORT=services.sink.port,
            )
            command = [
                str(services.celery_python), "-m", "celery", "-A", "bench.celery_app", "worker",
                "--pool", self.target, "--loglevel", "INFO", "--hostname", f"{self.name}@bench",
                # cluster features: with one worker they only delay startup
                "--without-mingle", "--without-gossip",
            ]  # fmt: skip
            if self.celery_concurrency is not None:
                command += ["--concurrency", str(self.celery_concurrency)]
        return ChildProcess(self.name, command, log, env)

    async def ready(self, services: Services, worker: ChildProcess) -> bool:
        """arq: the worker's health-check key exists; Celery: its log says it is ready."""
        if self.kind == "arq":
            return bool(await services.redis.exists(default_queue_name + health_check_key_suffix))
        return f"{self.name}@bench ready." in worker.log_text()

    # --- jobs ---------------------------------------------------------------------------

    async def enqueue(
        self, services: Services, workload: WorkloadName, n: int, interval: float = 0.0
    ) -> Batch:
        """Send `n` jobs, all at once in batches or, with `interval`, one by one."""
        loop = asyncio.get_running_loop()
        if self.kind == "arq":
            # built before the clock starts (an email's validated as the API would): that is
            # the caller's work, and on a small machine it would take CPU from the worker
            calls = [arq_job(workload, i, services.pages_url()) for i in range(n)]
            started = loop.time()
            job_ids = await enqueue_arq(services, self.producer()[1], calls, interval)
            return Batch(n, loop.time() - started, job_ids)
        started = loop.time()
        times_key = f"{CELERY_TIMES_KEY}:{workload}:{'paced' if interval else 'burst'}"
        if services.celery_producer is None:
            raise BenchError("the Celery producer is not running")
        request = {
            "workload": workload, "n": n, "site": services.pages_url(),
            "times_key": times_key, "interval": interval,
        }  # fmt: skip
        seconds = await services.celery_producer.send(request)
        return Batch(n, seconds, [], times_key)

    async def completed(self, services: Services, batch: Batch) -> tuple[int, int]:
        """(jobs finished, Redis commands this call sent)."""
        if self.kind == "celery":
            return int(await services.redis.hlen(batch.times_key)), 1  # type: ignore[misc]
        keys = [result_key_prefix + job_id for job_id in batch.job_ids]
        chunks = [keys[i : i + KEYS_PER_COMMAND] for i in range(0, len(keys), KEYS_PER_COMMAND)]
        found = 0
        for chunk in chunks:
            found += int(await services.redis.exists(*chunk))
        return found, len(chunks)

    async def timings(self, services: Services, batch: Batch) -> list[Timing]:
        if self.kind == "celery":
            raw = await services.redis.hgetall(batch.times_key)  # type: ignore[misc]
            return [celery_timing(value) for value in raw.values()]
        result: list[Timing] = []
        keys = [result_key_prefix + job_id for job_id in batch.job_ids]
        for i in range(0, len(keys), KEYS_PER_COMMAND):
            for value in await services.redis.mget(keys[i : i + KEYS_PER_COMMAND]):
                if value is not None:
                    job = deserialize_result(value)
                    result.append(
                        Timing(
                            job.enqueue_time.timestamp(),
                            job.start_time.timestamp(),
                            job.finish_time.timestamp(),
                            bool(job.success),
                        )
                    )
        return result


def arq_env(services: Services) -> dict[str, Any]:
    """The settings every arq engine runs with (asyncjobs/settings.py names, upper-cased)."""
    return {
        "redis_url": services.redis_url,
        "scrape_allowed_cidrs": "127.0.0.0/8",
        "scrape_allowed_ports": "*",
        "scrape_per_host_concurrency": 0,  # no limit (0), so no politeness bookkeeping at all
        "scrape_min_host_delay": 0,
        "smtp_host": "127.0.0.1",
        "smtp_port": services.sink.port,
        "smtp_max_connections": 20,
        "worker_max_jobs": 500,
        "job_modules": "bench.userjobs",  # the asyncjobs worker's user jobs (arq: listed)
        # the http workload: signed, to the loopback site, no limits per target (the default)
        "http_jobs_secret": HTTP_JOBS_SECRET,
        "http_jobs_allowed_cidrs": "127.0.0.0/8",
        "http_jobs_allowed_ports": "*",
    }


def celery_timing(value: bytes) -> Timing:
    enqueued, started, finished, ok = value.decode().split()
    return Timing(float(enqueued), float(started), float(finished), ok == "1")


async def enqueue_arq(
    services: Services, producer: Producer, calls: list[tuple[str, dict[str, Any]]], interval: float
) -> list[str]:
    """`producer` per job, ENQUEUE_BATCH jobs in flight at once (arq has no bulk enqueue), or
    one by one `interval` seconds apart."""
    pool: ArqRedis = await create_pool(RedisSettings.from_dsn(services.redis_url))
    job_ids: list[str] = []
    try:
        if interval:
            for i, (function, kwargs) in enumerate(calls):
                if i:
                    await asyncio.sleep(interval)
                job_ids.append(await producer(pool, function, kwargs))
            return job_ids
        for first in range(0, len(calls), ENQUEUE_BATCH):
            batch = calls[first : first + ENQUEUE_BATCH]
            job_ids += await asyncio.gather(*(producer(pool, f, kw) for f, kw in batch))
        return job_ids
    finally:
        await pool.aclose(close_connection_pool=True)


class CeleryProducer:
    """`bench.celery_enqueue` in the Celery venv, kept running: Celery's own `send_task` per job,
    without paying the producer's start-up (importing Celery) inside a measured run."""

    def __init__(self, python: Path, redis_url: str, log: Path) -> None:
        self._command = [str(python), "-m", "bench.celery_enqueue"]
        self._env = child_env(BENCH_REDIS_URL=redis_url)
        self._log = log
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self._log.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *self._command, env=self._env, cwd=REPO, stdin=PIPE, stdout=PIPE, stderr=log
            )
        await self._answer()  # {"ready": true} once Celery is imported and connected

    async def send(self, request: dict[str, Any]) -> float:
        """Send a batch; returns the seconds sending took."""
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write(json.dumps(request).encode() + b"\n")
        await self._process.stdin.drain()
        return float((await self._answer())["seconds"])

    async def _answer(self) -> dict[str, Any]:
        assert self._process is not None and self._process.stdout is not None
        try:
            line = await asyncio.wait_for(self._process.stdout.readline(), 600)
        except TimeoutError:
            line = b""
        if not line:
            tail = self._log.read_text(errors="replace")[-2000:]
            raise BenchError(f"the Celery producer stopped answering:\n{tail}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def stop(self) -> None:
        if self._process is not None and self._process.returncode is None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()


ENGINES: dict[str, Engine] = {
    engine.name: engine
    for engine in (
        Engine("asyncjobs", "arq", ASYNCJOBS_SETTINGS, 500,
               "this project's worker as production runs it (+ a no-op job)"),
        Engine("asyncjobs-2", "arq", ASYNCJOBS_SETTINGS, 500,
               "the same, two worker processes (for CPU-bound jobs)", processes=2),
        Engine("arq-default", "arq", "bench.arq_settings.DefaultSettings", 10,
               "plain arq 0.28, default settings (max_jobs=10, poll_delay=0.5)"),
        Engine("arq-tuned", "arq", "bench.arq_settings.TunedSettings", 500,
               "plain arq 0.28, max_jobs=500, poll_delay=0.01"),
        Engine("celery-prefork", "celery", "prefork", os.cpu_count() or 1,
               "Celery 5 prefork pool, default concurrency (= CPU count)"),
        Engine("celery-threads", "celery", "threads", 100,
               "Celery 5 threads pool, concurrency 100", celery_concurrency=100),
    )
}  # fmt: skip


def stack_variant(base: Engine, speedups: str) -> Engine:
    """`base` with ASYNCJOBS_SPEEDUPS set (asyncjobs/speedups.py): for the fast stack's ablation."""
    return dataclasses.replace(
        base,
        name=f"{base.name}+{speedups.replace(',', '+')}",
        description=f"{base.description}; ASYNCJOBS_SPEEDUPS={speedups}",
        settings=(*base.settings, ("asyncjobs_speedups", speedups)),
    )


# `python -m bench jobs --engines ...`: each piece of the fast stack on its own, and none (the
# default engines run with all three).
STACK_ENGINES: dict[str, Engine] = {
    variant.name: variant
    for variant in (
        *(stack_variant(ENGINES["asyncjobs"], s) for s in ("none", "uvloop", "hiredis", "orjson")),
        stack_variant(ENGINES["arq-tuned"], "none"),
    )
}

# The production worker as it was before issue 17 (the fast stack and less work per job): the
# CPU-per-job baseline, run in the same bench run as today's (`--engines asyncjobs,asyncjobs@...`).
BEFORE_ISSUE_17 = "1b42d13"


def at_revision(base: Engine, revision: str) -> Engine:
    """`base` with the worker's code exported from git at `revision` (fed by today's producer,
    so the job arguments on the wire must stay readable by that code)."""
    return dataclasses.replace(
        base,
        name=f"{base.name}@{revision}",
        description=f"{base.description}, as of commit {revision}",
        revision=revision,
    )


def engine_named(name: str) -> Engine:
    """A known engine, or `asyncjobs@<git revision>`; KeyError for anything else."""
    if name in ENGINES or name in STACK_ENGINES:
        return (ENGINES | STACK_ENGINES)[name]
    base, at, revision = name.partition("@")
    if at and revision and base in ENGINES and ENGINES[base].target == ASYNCJOBS_SETTINGS:
        return at_revision(ENGINES[base], revision)
    raise KeyError(name)


def checkout(revision: str) -> Path:
    """The tree of `revision`, exported once into the bench's cache (git archive)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--verify", f"{revision}^{{commit}}"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BenchError(f"no git commit {revision!r} in {REPO}: {exc}") from exc
    folder = CACHE / "revisions" / commit
    if not (folder / "worker_settings.py").exists():
        folder.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", commit],
            capture_output=True, check=True,
        )  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


# Not one of the compared engines: the production worker opened up to 1,000 jobs and HTTP
# connections at once, to measure memory with 1,000 scrape jobs in flight (full mode only).
WIDE = Engine(
    "asyncjobs-1000", "arq", ASYNCJOBS_SETTINGS, 1000,
    "asyncjobs with WORKER_MAX_JOBS=1000, SCRAPE_MAX_CONNECTIONS=1000", http_pool=1000,
    settings=(("worker_max_jobs", 1000), ("scrape_max_connections", 1000)),
)  # fmt: skip
