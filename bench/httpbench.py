"""The API bench: `POST /jobs/email` against `python -m app web`, from a loopback load generator.

The API runs as a subprocess configured like production (environment only) with a generated key
and a rate limit too high to matter; the load generator is an aiohttp client in the bench's own
process, `concurrency` requests in flight. No worker runs: the jobs just queue up in Redis.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.common import EMAIL_HTML, EMAIL_SUBJECT, EMAIL_TEXT, recipient
from bench.procstat import TreeSampler
from bench.services import (
    BenchError,
    ChildProcess,
    RedisServer,
    child_env,
    free_port,
    python_module,
    wait_until,
)
from bench.stats import percentile

PATH = "/jobs/email"


@dataclass
class HttpResult:
    requests: int
    concurrency: int
    status: str = "ok"
    error: str | None = None
    statuses: dict[str, int] = field(default_factory=dict)
    seconds: float | None = None
    requests_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    peak_rss_mb: float | None = None
    cpu_s_per_1k: float | None = None
    redis_cmds_per_request: float | None = None


async def run_http(redis: RedisServer, log: Path, requests: int, concurrency: int) -> HttpResult:
    result = HttpResult(requests, concurrency)
    key, port = secrets.token_urlsafe(24), free_port()
    env = child_env(
        api_keys=key, rate_limit_requests=10_000_000, mail_messages_per_hour=10_000_000,
        redis_url=redis.url,
        web_host="127.0.0.1", web_port=port,
    )  # fmt: skip
    await redis.reset()
    web = ChildProcess("web", python_module("app", "web"), log, env)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {key}"}
    connector = aiohttp.TCPConnector(limit=concurrency)
    try:
        async with aiohttp.ClientSession(base, connector=connector, headers=headers) as http:

            async def healthy() -> bool:
                if web.exited() is not None:
                    raise BenchError(f"`python -m app web` exited:\n{web.log_tail()}")
                try:
                    async with http.get("/health") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_until(healthy, 30, "`python -m app web`")
            sampler = TreeSampler(web.pid)
            before = await redis.command_calls()
            sampler.start()
            latencies, statuses, seconds = await load(http, requests, concurrency)
            after = await redis.command_calls()
            result.peak_rss_mb, cpu = await sampler.stop()
        result.statuses = dict(statuses)
        result.seconds = seconds
        result.requests_per_s = requests / seconds
        result.p50_ms, result.p99_ms = percentile(latencies, 50), percentile(latencies, 99)
        result.cpu_s_per_1k = cpu / requests * 1000
        result.redis_cmds_per_request = (sum(after.values()) - sum(before.values())) / requests
        if set(statuses) != {"202"}:
            result.status = "errors"
    except BenchError as exc:
        result.status, result.error = "error", str(exc)
    finally:
        await web.stop()
    return result


async def load(
    http: aiohttp.ClientSession, requests: int, concurrency: int
) -> tuple[list[float], Counter[str], float]:
    """`concurrency` clients, each sending its next request as soon as the previous answered."""
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    remaining = iter(range(requests))

    async def client() -> None:
        for n in remaining:
            body = {
                "to": recipient(n),
                "subject": EMAIL_SUBJECT.format(n=n),
                "text": EMAIL_TEXT.format(n=n),
                "html": EMAIL_HTML.format(n=n),
            }
            sent = time.perf_counter()
            try:
                async with http.post(PATH, json=body) as response:
                    await response.read()
                    statuses[str(response.status)] += 1
            except aiohttp.ClientError as exc:
                statuses[type(exc).__name__] += 1
            latencies.append((time.perf_counter() - sent) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, statuses, time.perf_counter() - started
