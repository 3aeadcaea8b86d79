"""`python -m bench.politeness [--pages 500] [--configs off,defaults,fast]`: how fast a batch of
pages of one host goes through the production worker with politeness off and on, side by side
in one run; prints a markdown table.

It starts its own redis-server and the bench site (pages answer in 50 ms), then for each setting
the production worker (`arq worker_settings.WorkerSettings`, its defaults but the politeness
settings named here) in a process of its own, enqueues every page at once and waits for all.
With politeness on, a host's limit is one request start per `SCRAPE_MIN_HOST_DELAY` seconds
(`SCRAPE_PER_HOST_CONCURRENCY` at once matters only for pages slower than that), so 500 pages
with the defaults take about 500 s: the figure to read is pages/s against that limit.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.jobs import Job

from asyncjobs.arqcompat import default_queue_name, health_check_key_suffix
from asyncjobs.settings import Settings
from bench.common import page_url
from bench.services import ChildProcess, RedisServer, Site, child_env, python_module, wait_until
from jobs.engine.queue import enqueue_job


def _default(name: str) -> Any:
    return Settings.model_fields[name].default


CONFIGS: dict[str, dict[str, Any]] = {
    "off": {"scrape_per_host_concurrency": 0, "scrape_min_host_delay": 0},
    "defaults": {
        "scrape_per_host_concurrency": _default("scrape_per_host_concurrency"),
        "scrape_min_host_delay": _default("scrape_min_host_delay"),
    },
    "fast": {"scrape_per_host_concurrency": 2, "scrape_min_host_delay": 0.5},
}


@dataclass
class Outcome:
    setting: str
    pages: int
    seconds: float
    failed: int
    retried: int
    max_in_flight: int
    fetch_ms_p50: float
    queued_s_max: float

    def row(self) -> str:
        s = CONFIGS[self.setting]
        delay = float(s["scrape_min_host_delay"])
        limit = f"{1 / delay:g}" if delay else "none"
        politeness = (
            f"{s['scrape_per_host_concurrency']} at once, {delay:g} s apart" if delay else "off"
        )
        return (
            f"| {self.setting} ({politeness}) | {self.pages} | {self.seconds:.1f} | "
            f"{self.pages / self.seconds:.2f} | {limit} | {self.failed} | {self.retried} | "
            f"{self.max_in_flight} | {self.fetch_ms_p50:.1f} | {self.queued_s_max:.1f} |"
        )


async def run_setting(
    name: str, pages: int, redis: RedisServer, site: Site, folder: Path
) -> Outcome:
    await redis.reset()
    await site.reset()
    env = child_env(
        redis_url=redis.url,
        scrape_allowed_cidrs="127.0.0.0/8",
        scrape_allowed_ports="*",
        **CONFIGS[name],
    )
    command = python_module("arq", "worker_settings.WorkerSettings")
    worker = ChildProcess(f"worker-{name}", command, folder / f"worker-{name}.log", env)
    pool: ArqRedis = await create_pool(RedisSettings.from_dsn(redis.url))
    try:
        health = default_queue_name + health_check_key_suffix
        await wait_until(lambda: redis.client.exists(health), 60, "the worker")
        started = time.time()
        ids = [
            await enqueue_job(pool, "scrape", target={"url": page_url(site.url, n)})
            for n in range(pages)
        ]
        await wait_until(
            lambda: _all_done(pool), timeout=pages * 3 + 120, what="the batch", interval=0.5
        )
        infos = [await Job(str(i), pool).result_info() for i in ids]
        done = [i for i in infos if i is not None]
        ok = [i.result for i in done if i.success]
        return Outcome(
            setting=name,
            pages=pages,
            seconds=max(i.finish_time.timestamp() for i in done) - started,
            failed=pages - len(ok),
            retried=sum(1 for i in done if i.job_try > 1),
            max_in_flight=(await site.stats())["max_in_flight"],
            fetch_ms_p50=statistics.median(r["fetch_ms"] for r in ok) if ok else 0.0,
            queued_s_max=max((r["queued_for_host_ms"] for r in ok), default=0) / 1000,
        )
    finally:
        await pool.aclose()
        await worker.stop()


async def _all_done(pool: ArqRedis) -> bool:
    return int(await pool.zcard(default_queue_name)) == 0


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.politeness", description=__doc__)
    parser.add_argument("--pages", type=int, default=500)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated")
    args = parser.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    if unknown := set(names) - set(CONFIGS):
        parser.error(f"unknown configs: {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory(prefix="bench-politeness-") as tmp:
        folder = Path(tmp)
        redis, site = RedisServer(folder), Site(folder)
        try:
            await redis.started()
            await site.started()
            outcomes = []
            for name in names:
                print(f"bench: {name}: {args.pages} pages of one host", file=sys.stderr)
                outcomes.append(await run_setting(name, args.pages, redis, site, folder))
        finally:
            await site.process.stop()
            await redis.stop()
    print(
        "| politeness | pages | seconds | pages/s | limit pages/s | failed | retried | "
        "most in flight | fetch_ms p50 | longest wait for the host, s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for outcome in outcomes:
        print(outcome.row())
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
