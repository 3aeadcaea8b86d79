"""`python -m bench [all|jobs|http] [--quick]`: the same workloads through several engines, side
by side in one run; prints markdown tables and writes bench/results/latest.json.

It starts everything it needs on loopback (its own redis-server, the HTTP site, the SMTP sink,
each worker) and stops it all at the end; worker logs are kept in bench/.cache/logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import sys
import time
from pathlib import Path

from bench.batchcallback import (
    ROUNDS,
    BatchCallbackResult,
    has_batch_callback,
    measure_batch_callback,
    skipped_batch_callback,
    summary,
)
from bench.engines import (
    ASYNCJOBS_SETTINGS,
    BEFORE_ISSUE_17,
    ENGINES,
    STACK_ENGINES,
    WIDE,
    CeleryProducer,
    Services,
    engine_named,
)
from bench.httpbench import HttpResult, run_http
from bench.report import machine, render, write_json
from bench.runner import PickupResult, RunResult, measure_drain, run_workload
from bench.services import CACHE, REPO, BenchError, RedisServer, Sink, Site, celery_python
from bench.workloads import NEWER_WORKLOADS, WORKLOADS, WorkloadName

DEFAULT_JSON = REPO / "bench" / "results" / "latest.json"
HTTP_REQUESTS = {"full": 2000, "quick": 300}
HTTP_CONCURRENCY = 50
# The memory probe's pages answer this slowly, so that the worker, which starts a few hundred
# jobs a second, gets 1,000 of them in flight at once.
MEMORY_PROBE_PAGE_MS = 5000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("suite", nargs="?", choices=["all", "jobs", "http"], default="all")
    parser.add_argument("--quick", action="store_true", help="small workloads (about a minute)")
    parser.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help="comma-separated (default: the compared engines); the fast stack's ablation: "
        + ",".join(STACK_ENGINES)
        + "; the worker as of a git commit: asyncjobs@<commit> "
        + f"(before issue 17: asyncjobs@{BEFORE_ISSUE_17})",
    )
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma-separated (default: all)"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where results go")
    parser.add_argument(
        "--jobs", type=int, default=None, help="jobs per workload (default: its full or quick size)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample each arq worker with py-spy during its run and print where its CPU went "
        "(slows the worker: do not compare these figures with unprofiled runs)",
    )
    args = parser.parse_args(argv)
    for option, known in (("engines", is_engine), ("workloads", WORKLOADS.__contains__)):
        names = [n for n in getattr(args, option).split(",") if n]
        unknown = [name for name in names if not known(name)]
        if unknown:
            parser.error(f"unknown {option}: {', '.join(sorted(unknown))}")
        setattr(args, option, names)
    return args


def is_engine(name: str) -> bool:
    try:
        engine_named(name)
    except KeyError:
        return False
    return True


def say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> int:
    mode = "quick" if args.quick else "full"
    engines = [engine_named(name) for name in args.engines]
    workloads: list[WorkloadName] = args.workloads if args.suite != "http" else []
    logs = CACHE / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    redis, site, sink = RedisServer(logs), Site(logs), Sink(logs)
    runs: list[RunResult] = []
    pickups: list[PickupResult] = []
    batches: list[BatchCallbackResult] = []
    http: HttpResult | None = None
    producer: CeleryProducer | None = None
    try:
        venv = None
        if workloads and any(e.kind == "celery" for e in engines):
            venv = await asyncio.to_thread(celery_python)
        await asyncio.gather(redis.started(), site.started(), sink.started())
        services = Services(redis.url, redis.client, site, sink, logs, venv)
        if venv is not None:
            services.celery_producer = producer = CeleryProducer(
                venv, redis.url, logs / "celery-producer.log"
            )
            await producer.start()
        services.server_pids = {
            "redis": redis.process.pid,
            "site": site.process.pid,
            "sink": sink.process.pid,
        }
        for name in workloads:
            workload = WORKLOADS[name]
            n = args.jobs or workload.size(args.quick)
            for engine in engines:
                if name in NEWER_WORKLOADS and engine.revision is not None:
                    say(f"{name} x {engine.name}: skipped (an older worker may not have its job)")
                    continue
                say(f"{name} x {engine.name}: {n:,} jobs")
                began = time.monotonic()
                profile = args.profile and engine.kind == "arq"
                result, pickup = await run_workload(
                    engine, workload, n, services, redis, profile=profile
                )
                runs.append(result)
                say(
                    f"  {result.status}: {result.completed:,}/{n:,} done"
                    + (f", {result.jobs_per_s:,.0f} jobs/s" if result.jobs_per_s else "")
                    + (f" ({result.error.splitlines()[0]})" if result.error else "")
                    + f" [{time.monotonic() - began:.1f} s]"
                )
                if pickup is not None:
                    pickups.append(pickup)
        if not args.quick and "noop" in workloads:
            n = args.jobs or WORKLOADS["noop"].full
            for engine in engines:
                say(f"noop drain x {engine.name}: {n:,} jobs queued before the worker starts")
                drained = await measure_drain(engine, WORKLOADS["noop"], n, services, redis)
                runs.append(drained)
                say(f"  {drained.status}: {drained.jobs_per_s or 0:,.0f} jobs/s")
        if "noop" in workloads:  # issue 31's row: no-op batches with a callback, and without
            for engine in engines:
                if engine.target != ASYNCJOBS_SETTINGS:
                    continue
                if not has_batch_callback(engine):
                    say(f"batch callback x {engine.name}: skipped (no batch callbacks there)")
                    batches.append(skipped_batch_callback(engine))
                    continue
                say(f"batch callback x {engine.name}: {ROUNDS[mode]} x 2 batches of 1,000 jobs")
                batch = await measure_batch_callback(engine, services, redis, ROUNDS[mode])
                batches.append(batch)
                p50, worst = summary(batch)["latency_p50_ms"], summary(batch)["latency_max_ms"]
                say(
                    f"  {batch.status}"
                    + (f": callback latency p50 {p50:.0f} ms, max {worst:.0f} ms" if worst else "")
                    + (f" ({batch.error.splitlines()[0]})" if batch.error else "")
                )
        if not args.quick and "scrape" in workloads and "asyncjobs" in args.engines:
            n = WORKLOADS["scrape"].full
            say(f"memory: scrape x {WIDE.name}: {n:,} jobs")
            slow = dataclasses.replace(services, page_delay_ms=MEMORY_PROBE_PAGE_MS)
            wide, _ = await run_workload(WIDE, WORKLOADS["scrape"], n, slow, redis)
            runs.append(wide)
        if args.suite in ("all", "http"):
            requests = HTTP_REQUESTS[mode]
            say(f"http: {requests:,} x POST /jobs/email, {HTTP_CONCURRENCY} concurrent")
            http = await run_http(redis, logs / "web.log", requests, HTTP_CONCURRENCY)
    except BenchError as exc:
        say(f"error: {exc}")
        return 2
    finally:
        if producer is not None:
            await producer.stop()
        await asyncio.gather(
            redis.stop(), site.process.stop(), sink.process.stop(), return_exceptions=True
        )
    info = machine()
    write_json(args.json, info, mode, runs, pickups, http, batches)
    print(render(info, mode, runs, pickups, http, batches))
    for result in runs:
        if result.profile:
            print(f"\n## Profile: {result.workload} x {result.engine}\n\n{result.profile}")
    say(f"results written to {args.json}; logs in {logs}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
