"""Classified retries: transient errors back off and retry, permanent ones are dead-lettered."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from arq.connections import ArqRedis
from arq.worker import Worker

from app.settings import Settings
from jobs.deadletter import get_dead_letter
from jobs.retry import backoff_delay
from jobs.scrape import parse_retry_after
from tests.helpers import ApiClient, wait_for
from tests.jobwait import wait_job
from tests.servers import SiteStats


async def enqueue_scrape(api: ApiClient, url: str) -> str:
    response = await api.post("/jobs/scrape", json={"url": url})
    assert response.status == 202
    job_id: str = (await response.json())["job_id"]
    return job_id


async def test_transient_failures_are_retried_until_success(
    api: ApiClient, worker: Worker, site: tuple[str, SiteStats], redis: ArqRedis
) -> None:
    base, stats = site
    job_id = await enqueue_scrape(api, f"{base}/flaky?key=a&fail=2&status=503")
    status = await wait_job(api, job_id)
    assert status["status"] == "complete", status
    assert status["tries"] == 3
    assert stats.hits["flaky:a"] == 3
    assert await get_dead_letter(redis, job_id) is None


async def test_exhausted_retries_are_dead_lettered(
    api: ApiClient, worker: Worker, site: tuple[str, SiteStats], redis: ArqRedis
) -> None:
    base, stats = site
    job_id = await enqueue_scrape(api, f"{base}/flaky?key=b&fail=99&status=500")
    status = await wait_job(api, job_id)
    assert status["status"] == "failed"
    assert "HTTP 500" in status["error"]
    assert stats.hits["flaky:b"] == 3  # scrape_max_tries
    entry = await get_dead_letter(redis, job_id)
    assert entry is not None
    assert (entry.reason, entry.tries, entry.function) == ("exhausted", 3, "scrape")
    assert entry.arguments["target"]["url"].endswith("key=b&fail=99&status=500")


@pytest.mark.parametrize("status_code", [404, 403, 410])
async def test_permanent_http_errors_fail_after_one_try(
    api: ApiClient, worker: Worker, site: tuple[str, SiteStats], redis: ArqRedis, status_code: int
) -> None:
    base, stats = site
    key = f"p{status_code}"
    job_id = await enqueue_scrape(api, f"{base}/flaky?key={key}&fail=99&status={status_code}")
    status = await wait_job(api, job_id)
    assert status["status"] == "failed" and status["tries"] == 1
    assert f"HTTP {status_code}" in status["error"]
    assert stats.hits[f"flaky:{key}"] == 1
    entry = await get_dead_letter(redis, job_id)
    assert entry is not None and entry.reason == "permanent"


async def test_retry_after_is_honoured(
    api: ApiClient, worker: Worker, site: tuple[str, SiteStats], redis: ArqRedis
) -> None:
    """A 429 with Retry-After: 1 defers the job by the 0.5 s cap, not the 50 ms base delay."""
    base, _ = site
    job_id = await enqueue_scrape(api, f"{base}/flaky?key=r&fail=1&status=429&retry_after=1")

    async def deferred() -> float | None:
        score = await redis.zscore("arq:queue", job_id)
        view = await (await api.get(f"/jobs/{job_id}")).json()
        return score if view["status"] == "deferred" else None

    score = await wait_for(deferred, what="the 429'd job to be deferred")
    assert score - datetime.now(UTC).timestamp() * 1000 > 300
    status = await wait_job(api, job_id)
    assert status["status"] == "complete" and status["tries"] == 2


def test_backoff_grows_exponentially_with_jitter_and_cap(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(retry_base_delay=1.0, retry_max_delay=10.0)
    for job_try, (lo, hi) in {1: (0.5, 1), 2: (1, 2), 3: (2, 4), 4: (4, 8), 9: (5, 10)}.items():
        delays = [backoff_delay(settings, job_try) for _ in range(200)]
        assert lo <= min(delays) and max(delays) <= hi, job_try
        assert len(set(delays)) > 100  # jittered, not constant
    assert backoff_delay(settings, 1, retry_after=7) >= 7
    assert backoff_delay(settings, 1, retry_after=3600) <= 10  # capped


def test_parse_retry_after() -> None:
    assert parse_retry_after("120") == 120
    future = datetime.now(UTC) + timedelta(seconds=60)
    parsed = parse_retry_after(format_datetime(future, usegmt=True))
    assert parsed is not None and 55 < parsed <= 60
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
