"""Batches over real HTTP: `POST /batches` and a `urls` scrape with a `callback`, against the
real app on loopback and a real worker. The callback runs once when every job has ended, with
the counts by outcome (failures included); a URL callback is a signed POST to a loopback
receiver; a batch is charged as its jobs would be one by one (rate limit, message quota)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from arq.connections import ArqRedis

from asyncjobs import JobContext, job
from asyncjobs.errors import PermanentJobError
from asyncjobs.registry import unregister
from asyncjobs.settings import Settings
from tests.conftest import api_and_worker
from tests.helpers import ApiClient
from tests.http.test_webhooks import SECRET, Receiver, receiver  # noqa: F401 (a fixture)
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler, SiteStats

callback_runs: list[dict[str, Any]] = []  # what the callback job received, one entry per run


async def tally(ctx: JobContext, n: int) -> int:
    if n < 0:
        raise PermanentJobError(f"{n} is negative")
    return n


async def summarize(ctx: JobContext, label: str = "", batch: dict[str, Any] | None = None) -> str:
    callback_runs.append({"label": label, "batch": batch})
    return "summarized"


@pytest.fixture
def declared() -> Iterator[None]:
    """The two jobs, declared for these tests only (before the app and worker read them)."""
    callback_runs.clear()
    job(name="tally", tries=1)(tally)
    job(name="summarize", tries=1)(summarize)
    try:
        yield None
    finally:
        unregister("tally")
        unregister("summarize")


@pytest.fixture
async def served(
    declared: None, make_settings: Callable[..., Settings], redis: ArqRedis
) -> AsyncIterator[ApiClient]:
    async with api_and_worker(make_settings(webhook_secret=SECRET)) as client:
        yield client


async def post_batch(api: ApiClient, body: dict[str, Any], status: int = 202) -> Any:
    response = await api.post("/batches", json=body)
    text = await response.text()
    assert response.status == status, text
    return json.loads(text) if status == 202 else text


async def test_a_batch_callback_runs_once_with_the_counts_failures_included(
    served: ApiClient, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    email = {"to": "ada@example.com", "subject": "In the batch", "text": "Hello"}
    jobs = [{"type": "tally", "body": {"n": n}} for n in (1, 2, 3, -1)]
    jobs.append({"type": "email", "body": email})
    callback = {"type": "summarize", "body": {"label": "done"}}
    accepted = await post_batch(served, {"jobs": jobs, "callback": callback})
    batch_id = accepted["batch_id"]
    assert accepted["callback_job_id"] == f"{batch_id}-callback"
    assert accepted["job_ids"] == [f"{batch_id}-{n}" for n in range(5)]
    end = await wait_job(served, accepted["callback_job_id"])
    assert end["status"] == "complete", end
    summary = {
        "batch_id": batch_id,
        "total": 5,
        "counts": {"complete": 4, "failed": 1, "aborted": 0},
    }
    assert callback_runs == [{"label": "done", "batch": summary}]
    statuses = [(await wait_job(served, job_id))["status"] for job_id in accepted["job_ids"]]
    assert statuses == ["complete", "complete", "complete", "failed", "complete"]
    view = await (await served.get(accepted["batch_url"])).json()
    assert view["total"] == 5 and view["finished"] == 5
    assert [m.message["Subject"] for m in smtp[0].messages] == ["In the batch"]
    await asyncio.sleep(0.3)  # nothing runs it again
    assert len(callback_runs) == 1


async def test_a_url_callback_is_one_signed_post_with_the_counts(
    served: ApiClient,
    receiver: Receiver,  # noqa: F811  (the fixture)
) -> None:
    jobs = [{"type": "tally", "body": {"n": n}} for n in (1, -2, 3)]
    accepted = await post_batch(served, {"jobs": jobs, "callback": {"url": receiver.url}})
    batch_id = accepted["batch_id"]
    end = await wait_job(served, accepted["callback_job_id"])
    assert end["status"] == "complete", end
    await asyncio.sleep(0.3)  # a second delivery would have come by now
    assert len(receiver.calls) == 1
    call = receiver.calls[0]
    assert call["signed"]
    assert call["payload"]["event"] == "batch.finished"
    assert call["payload"]["batch_id"] == batch_id
    assert call["payload"]["total"] == 3
    assert call["payload"]["counts"] == {"complete": 2, "failed": 1, "aborted": 0}


async def test_a_urls_scrape_calls_back_once_its_pages_are_done(
    served: ApiClient, site: tuple[str, SiteStats]
) -> None:
    base, stats = site
    urls = [f"{base}/page/1", f"{base}/page/2", f"{base}/missing"]
    body = {"urls": urls, "callback": {"type": "summarize", "body": {"label": "scraped"}}}
    response = await served.post("/jobs/scrape", json=body)
    assert response.status == 202, await response.text()
    accepted = await response.json()
    end = await wait_job(served, accepted["callback_job_id"])
    assert end["status"] == "complete", end
    statuses = [(await wait_job(served, j["job_id"]))["status"] for j in accepted["jobs"]]
    counts = {s: statuses.count(s) for s in ("complete", "failed", "aborted")}
    assert counts["complete"] == 2  # the two pages; /missing is a 404
    assert callback_runs == [
        {
            "label": "scraped",
            "batch": {"batch_id": accepted["batch_id"], "total": 3, "counts": counts},
        }
    ]
    assert stats.hits.get("/page/1") == 1


async def test_bad_batches_are_422s_before_anything_is_stored(
    declared: None, make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    async with api_and_worker(make_settings()) as api:  # no WEBHOOK_SECRET
        one = [{"type": "tally", "body": {"n": 1}}]
        cases: list[tuple[dict[str, Any], str]] = [
            ({"jobs": []}, "at least 1"),
            ({"jobs": one * 101}, "at most 100 jobs in one batch (BATCH_MAX_JOBS)"),
            ({"jobs": [{"type": "no_such_type"}]}, "no job type 'no_such_type'"),
            ({"jobs": [{"type": "export"}]}, "no job type 'export'"),  # not one that batches
            ({"jobs": [{"type": "tally", "body": {"n": "x"}}]}, "tally"),
            ({"jobs": [{"type": "email", "body": {"subject": "no one"}}]}, "to"),
            ({"jobs": one, "callback": {}}, "give one of 'url' or 'type'"),
            (
                {"jobs": one, "callback": {"type": "summarize", "url": "http://a.example/"}},
                "one of",
            ),
            ({"jobs": one, "callback": {"type": "no_such_type"}}, "no job type"),
            ({"jobs": one, "callback": {"url": "http://127.0.0.1:9/x"}}, "WEBHOOK_SECRET"),
            ({"jobs": one, "extra": 1}, "extra"),
        ]
        for body, says in cases:
            text = await post_batch(api, body, status=422)
            assert says.lower() in text.lower(), (body if len(str(body)) < 300 else says, text)
        urls = {"urls": ["http://127.0.0.1:9/a"], "callback": {"url": "http://127.0.0.1:9/x"}}
        response = await api.post("/jobs/scrape", json=urls)
        assert response.status == 422 and "WEBHOOK_SECRET" in await response.text()
    assert not [key async for key in redis.scan_iter("arq:job:*")]  # nothing was enqueued


async def test_a_batch_is_charged_for_every_job_it_enqueues(
    declared: None, make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    """RATE_LIMIT_REQUESTS 10 an hour: 8 jobs and a callback job count 9 (a URL callback
    would be free), a batch of 11 jobs never fits (a 422; its arrival counted, the 10th), and
    the next request is a 429. MAIL_MESSAGES_PER_HOUR 3: a batch whose emails send 4 messages
    never fits; one sending 2 fits, and then one more does not."""
    settings = make_settings(rate_limit_requests=10, rate_limit_window=3600)
    async with api_and_worker(settings) as api:
        one = {"type": "tally", "body": {"n": 1}}
        await post_batch(api, {"jobs": [one] * 8, "callback": {"type": "summarize"}})
        text = await post_batch(api, {"jobs": [one] * 11}, status=422)
        assert "counts 11" in text and "never fits" in text
        assert (await api.post("/batches", json={"jobs": [one]})).status == 429
    two = {"to": ["a@example.com", "b@example.com"], "subject": "S", "text": "x"}
    email = {"type": "email", "body": two}
    quota = {"mail_messages_per_hour": 3, "newsletter_max_recipients": 3, "mail_max_recipients": 3}
    async with api_and_worker(make_settings(**quota)) as api:
        text = await post_batch(api, {"jobs": [email, email]}, status=422)
        assert "3" in text
        await post_batch(api, {"jobs": [email]})  # 2 of the 3
        assert (await api.post("/batches", json={"jobs": [email]})).status == 429


async def test_the_largest_batch_fits_the_default_rate_limit(
    declared: None, make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    """Defaults agree: BATCH_MAX_JOBS jobs and a callback fit RATE_LIMIT_REQUESTS' window (with
    1,000 jobs allowed and 120 requests a minute, any batch over 119 was a 422)."""
    defaults = Settings.model_fields
    limit = defaults["rate_limit_requests"].default
    largest = defaults["batch_max_jobs"].default
    settings = make_settings(rate_limit_requests=limit, webhook_secret=SECRET)
    async with api_and_worker(settings) as api:
        one = {"type": "tally", "body": {"n": 1}}
        accepted = await post_batch(
            api, {"jobs": [one] * largest, "callback": {"type": "summarize"}}
        )
        assert len(accepted["job_ids"]) == largest
        end = await wait_job(api, accepted["callback_job_id"], timeout=60)
        assert end["status"] == "complete", end
    assert [run["batch"]["counts"] for run in callback_runs] == [
        {"complete": largest, "failed": 0, "aborted": 0}
    ]
