"""Classified retries: transient errors back off and retry, permanent ones are dead-lettered."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from arq.connections import ArqRedis
from arq.worker import Worker

from asyncjobs.registry import RetryPolicy
from asyncjobs.settings import Settings
from jobs.deadletter import get_dead_letter
from jobs.retry import backoff_delay, retry_policy
from jobs.scrape.fetch import parse_retry_after
from tests.helpers import ApiClient, wait_for
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler, SiteStats


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
    policy = retry_policy(make_settings(retry_base_delay=1.0, retry_max_delay=10.0), "scrape")
    for job_try, (lo, hi) in {1: (0.5, 1), 2: (1, 2), 3: (2, 4), 4: (4, 8), 9: (5, 10)}.items():
        delays = [backoff_delay(policy, job_try) for _ in range(200)]
        assert lo <= min(delays) and max(delays) <= hi, job_try
        assert len(set(delays)) > 100  # jittered, not constant
    assert backoff_delay(policy, 1, retry_after=7) >= 7
    assert backoff_delay(policy, 1, retry_after=3600) <= 10  # capped


def test_parse_retry_after() -> None:
    assert parse_retry_after("120") == 120
    future = datetime.now(UTC) + timedelta(seconds=60)
    parsed = parse_retry_after(format_datetime(future, usegmt=True))
    assert parsed is not None and 55 < parsed <= 60
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_default_email_retries_span_more_than_a_day_like_an_mta() -> None:
    """With the defaults, even the shortest jittered schedule keeps trying a transient SMTP
    failure for over 24 hours, waits at most an hour between tries, and ends at the lifetime."""
    settings = Settings(_env_file=None)
    policy = retry_policy(settings, "email")
    shortest = [backoff_delay_floor(policy, t) for t in range(1, policy.max_tries)]
    assert policy.lifetime is not None
    assert sum(shortest) > policy.lifetime >= 24 * 3600  # the lifetime ends it, not max_tries
    assert max(backoff_delay(policy, t) for t in range(1, 60)) <= 3600
    assert backoff_delay(policy, 1) <= 60  # the first retry comes within a minute
    now = datetime.now(UTC)
    assert not policy.expired(now - timedelta(hours=47), now)
    assert policy.expired(now - timedelta(hours=48), now)


def backoff_delay_floor(policy: RetryPolicy, job_try: int) -> float:
    """The least `backoff_delay` can return for a try ("equal jitter": half the ceiling)."""
    return min(policy.max_delay, policy.base_delay * 2.0 ** (job_try - 1)) / 2


async def test_a_plain_arq_producers_positional_call_is_dead_lettered(
    api: ApiClient, worker: Worker, redis: ArqRedis
) -> None:
    """arq's own `enqueue_job('send_email', {...}, message_id)`: the job takes keyword
    arguments only, so it fails at once, kept in the dead-letter store with why (it used to
    end in a TypeError that was neither dead-lettered nor counted)."""
    email = {"to": ["ada@example.com"], "subject": "Hi", "text": "Hello"}
    job = await redis.enqueue_job("send_email", email, "<mid@example.com>")
    assert job is not None
    status = await wait_job(api, job.job_id)
    assert status["status"] == "failed"
    entry = await get_dead_letter(redis, job.job_id)
    assert entry is not None and entry.reason == "permanent"
    assert "send_email takes keyword arguments only; got 2 positional" in entry.error


async def test_a_message_id_with_a_line_break_is_refused_for_good(
    api: ApiClient, worker: Worker, redis: ArqRedis, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    """A plain arq producer's message_id is not checked by the API: a CR LF in it would be a
    header of its own. The job refuses it before anything is sent, and keeps it."""
    email = {"to": ["ada@example.com"], "subject": "Hi", "text": "Hello"}
    job = await redis.enqueue_job(
        "send_email", email=email, message_id="<a@example.com>\r\nBcc: eve@example.com"
    )
    assert job is not None
    status = await wait_job(api, job.job_id)
    assert status["status"] == "failed"
    entry = await get_dead_letter(redis, job.job_id)
    assert entry is not None and "is not <left@right> on one line" in entry.error
    assert smtp[0].messages == []
