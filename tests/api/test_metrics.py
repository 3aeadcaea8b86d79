"""/metrics parses as Prometheus text and its counters move by exactly what a known batch did.
The worker's numbers cross processes through Redis; this test reads them through the API."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from arq.connections import ArqRedis
from arq.worker import Worker
from prometheus_client.parser import text_string_to_metric_families

from app.web import create_app
from asyncjobs.settings import Settings
from jobs.engine.dependencies import Dependencies, enqueue_with
from jobs.engine.queue import enqueue_job
from tests.conftest import READ_KEY
from tests.helpers import ApiClient, api_client, wait_for
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler, SiteStats


async def scrape_metrics(api: ApiClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await api.get("/metrics")
    assert response.status == 200
    assert response.content_type == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_a_known_batch(
    api: ApiClient,
    worker: Worker,
    smtp: tuple[RecordingSmtpHandler, int],
    site: tuple[str, SiteStats],
) -> None:
    before = await scrape_metrics(api)
    jobs = []
    for i in range(5):
        body = {"to": f"m{i}@example.com", "subject": "s", "text": "t"}
        jobs.append((await (await api.post("/jobs/email", json=body)).json())["job_id"])
    base = site[0]
    for path in ("/page/1", "/page/2", "/missing"):
        jobs.append(
            (await (await api.post("/jobs/scrape", json={"url": base + path})).json())["job_id"]
        )
    for job_id in jobs:
        await wait_job(api, job_id)

    async def flushed() -> dict[Any, float] | None:  # workers write their counts once a second
        samples = await scrape_metrics(api)
        done = value(samples, "asyncjobs_jobs_completed_total", function="send_email") == 5
        return (
            samples
            if done and value(samples, "asyncjobs_jobs_failed_total", function="scrape") == 1
            else None
        )

    after = await wait_for(flushed, timeout=10, interval=0.2, what="the worker's counts")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("asyncjobs_jobs_enqueued_total", function="send_email") == 5
    assert delta("asyncjobs_jobs_enqueued_total", function="scrape") == 3
    assert delta("asyncjobs_jobs_started_total", function="send_email") == 5
    assert delta("asyncjobs_jobs_completed_total", function="scrape") == 2
    assert delta("asyncjobs_jobs_dead_lettered_total", function="scrape") == 1
    assert delta("asyncjobs_emails_sent_total") == 5
    assert delta("asyncjobs_pages_scraped_total", status_class="2xx") == 2
    assert delta("asyncjobs_pages_scraped_total", status_class="error") == 1
    assert delta("asyncjobs_job_duration_seconds_count", function="send_email") == 5
    assert delta("asyncjobs_job_duration_seconds_bucket", function="send_email", le="+Inf") == 5
    assert delta("asyncjobs_job_pickup_latency_seconds_count", function="scrape") == 3
    assert value(after, "asyncjobs_dead_letters") == 1
    assert value(after, "asyncjobs_workers_alive") == 1
    assert value(after, "asyncjobs_queue_depth", state="queued") == 0
    posts = value(
        after, "asyncjobs_http_requests_total", method="POST", route="/jobs/email", status="202"
    )
    assert posts == 5


async def test_a_partly_refused_message_is_complete_with_a_warning_and_counted(
    api: ApiClient, worker: Worker, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    smtp[0].refuse_rcpt = {"gone@example.com"}
    before = await scrape_metrics(api)
    body = {"to": ["ok@example.com", "gone@example.com"], "subject": "s", "text": "t"}
    response = await api.post("/jobs/email", json=body)
    status = await wait_job(api, (await response.json())["job_id"])
    assert status["status"] == "complete"
    assert status["warning"].startswith("1 of 2 recipients refused: gone@example.com: 550"), status
    assert [m.rcpt_tos for m in smtp[0].messages] == [["ok@example.com"]]

    async def counted() -> bool:  # workers write their counts once a second
        after = await scrape_metrics(api)
        name = "asyncjobs_email_recipients_refused_total"
        return value(after, name) - value(before, name) == 1

    await wait_for(counted, timeout=10, interval=0.2, what="the refused recipient counted")


async def test_oldest_due_job_age_and_schedules(api: ApiClient, redis: ArqRedis) -> None:
    """No worker: a job enqueued 2 s in the past has waited about 2 s; a deferred one is not
    due, so it does not count, nor one waiting for it; schedules are counted by state."""
    samples = await scrape_metrics(api)
    assert value(samples, "asyncjobs_queue_oldest_age_seconds") == 0
    deferred = await enqueue_job(redis, "send_email", _defer_by=3600)
    assert deferred is not None
    assert await enqueue_with(redis, "send_email", {}, Dependencies(after=(deferred,)))
    job_id = await enqueue_job(redis, "send_email")
    assert job_id is not None
    await redis.zadd("arq:queue", {job_id: time.time() * 1000 - 2000}, xx=True)
    body = {"every": 3600, "job": {"type": "report"}}
    for paused in (False, True):
        created = await (await api.post("/schedules", json=body)).json()
        if paused:
            await api.post(f"/schedules/{created['id']}/pause")
    samples = await scrape_metrics(api)
    assert 1.9 <= value(samples, "asyncjobs_queue_oldest_age_seconds") < 10
    assert value(samples, "asyncjobs_queue_depth", state="deferred") == 1
    assert value(samples, "asyncjobs_queue_depth", state="waiting") == 1  # after the deferred
    assert value(samples, "asyncjobs_schedules", state="active") == 1
    assert value(samples, "asyncjobs_schedules", state="paused") == 1


async def test_http_errors_are_counted_with_the_status_the_client_got(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    """A 422 used to be counted as 500 (a ValidationError passed the counter before it became
    a 422), and 401, 403 and 429, answered by outer middlewares, were not counted at all."""
    settings = make_settings(rate_limit_requests=2, rate_limit_window=3600)
    async with api_client(create_app(settings)) as api:
        route = "/jobs/email"
        assert (await api.post(route, json={"to": "not an address"})).status == 422
        unauthorized = {"Authorization": "Bearer wrong"}
        assert (await api.post(route, json={}, headers=unauthorized)).status == 401
        read_only = {"Authorization": f"Bearer {READ_KEY}"}
        assert (await api.post(route, json={}, headers=read_only)).status == 403
        answers = [(await api.post(route, json={"to": "x"})).status for _ in range(3)]
        assert answers[-1] == 429
        samples = await scrape_metrics(api)
    counted = {
        status: value(samples, "asyncjobs_http_requests_total", method="POST", route=route,
                      status=status)
        for status in ("422", "401", "403", "429", "500")
    }  # fmt: skip
    expected = {"422": 1 + answers.count(422), "401": 1, "403": 1, "429": answers.count(429)}
    assert counted == expected | {"500": 0}
