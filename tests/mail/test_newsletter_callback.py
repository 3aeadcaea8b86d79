"""A newsletter's `callback` over real HTTP, with a real worker and the SMTP server on loopback:
it runs once, when every recipient's message is settled (sent, failed for good, aborted), with
the counts by outcome and the newsletter's id, as a batch's callback does (issue 31)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from arq.connections import ArqRedis

from app.bulkactions import abort_queued
from asyncjobs import JobContext, job
from asyncjobs.arqcompat import default_queue_name
from asyncjobs.registry import unregister
from asyncjobs.settings import Settings
from jobs.engine.dependencies import FollowUp, enqueue_counted_callback, read_waits
from jobs.mail.newsletter import child_job_id, settle_rest, start_progress
from jobs.mail.outcomes import BATCH_OUTCOMES, BatchOutcome, count_in_batch
from tests.conftest import api_and_worker
from tests.helpers import ApiClient, wait_for
from tests.http.test_webhooks import SECRET, Receiver, receiver  # noqa: F401 (a fixture)
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler

runs: list[dict[str, Any]] = []  # what the callback job received, one entry per run


async def newsletter_done(
    ctx: JobContext, label: str = "", batch: dict[str, Any] | None = None
) -> str:
    runs.append({"label": label, "batch": batch})
    return "noted"


@pytest.fixture
def declared() -> Iterator[None]:
    runs.clear()
    job(name="newsletter_done", tries=1)(newsletter_done)
    try:
        yield None
    finally:
        unregister("newsletter_done")


@pytest.fixture
async def served(
    declared: None, make_settings: Callable[..., Settings], redis: ArqRedis
) -> AsyncIterator[ApiClient]:
    async with api_and_worker(make_settings(webhook_secret=SECRET, worker_max_jobs=10)) as api:
        yield api


def newsletter(count: int, **extra: Any) -> dict[str, Any]:
    recipients = [f"reader{n}@example.com" for n in range(count)]
    return {"recipients": recipients, "subject": "News", "text": "Hello {{ email }}"} | extra


async def post_newsletter(api: ApiClient, body: dict[str, Any], status: int = 202) -> Any:
    response = await api.post("/jobs/newsletter", json=body)
    text = await response.text()
    assert response.status == status, text
    return json.loads(text) if status == 202 else text


@pytest.mark.slow
async def test_the_callback_runs_once_with_the_counts_a_refused_recipient_failed(
    served: ApiClient, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    handler = smtp[0]
    handler.refuse_rcpt.add("reader3@example.com")  # 550: failed for good
    callback = {"type": "newsletter_done", "body": {"label": "weekly"}}
    accepted = await post_newsletter(served, newsletter(8, callback=callback))
    newsletter_id = accepted["job_id"]
    assert accepted["callback_job_id"] == f"{newsletter_id}-callback"
    end = await wait_job(served, accepted["callback_job_id"], timeout=30)
    assert end["status"] == "complete", end
    counts = {"sent": 7, "failed": 1, "aborted": 0}
    assert runs == [
        {"label": "weekly", "batch": {"batch_id": newsletter_id, "total": 8, "counts": counts}}
    ]
    assert len(handler.messages) == 7
    view = await (await served.get(f"/jobs/{newsletter_id}")).json()
    assert view["progress"] | {"aborted": 0} == {
        "total": 8, "sent": 7, "failed": 1, "pending": 0, "aborted": 0,
    }  # fmt: skip
    await asyncio.sleep(0.5)  # nothing runs it again
    assert len(runs) == 1


@pytest.mark.slow
async def test_a_url_callback_is_posted_once(
    served: ApiClient,
    smtp: tuple[RecordingSmtpHandler, int],
    receiver: Receiver,  # noqa: F811
) -> None:
    smtp[0].refuse_rcpt.add("reader0@example.com")
    accepted = await post_newsletter(served, newsletter(5, callback={"url": receiver.url}))
    end = await wait_job(served, accepted["callback_job_id"], timeout=30)
    assert end["status"] == "complete", end
    await asyncio.sleep(0.5)  # a second delivery would have come by now
    assert len(receiver.calls) == 1
    call = receiver.calls[0]
    assert call["signed"]
    assert call["payload"] == {
        "event": "newsletter.finished",
        "batch_id": accepted["job_id"],
        "total": 5,
        "counts": {"sent": 4, "failed": 1, "aborted": 0},
    }


@pytest.mark.slow
async def test_an_invalid_recipient_counts_as_failed(
    served: ApiClient, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    """A recipient whose variables break the template is failed at the fan-out: no message
    job, counted with the rest (here it is the last outcome recorded, or not: either way)."""
    body = newsletter(3, callback={"type": "newsletter_done"})
    body["recipients"][1] = {"email": "bad@example.com", "vars": {"n": 0}}
    body["text"] = "{{ 1 / n if n is defined else 'hi' }}"
    accepted = await post_newsletter(served, body)
    end = await wait_job(served, accepted["callback_job_id"], timeout=30)
    assert end["status"] == "complete", end
    assert [run["batch"]["counts"] for run in runs] == [{"sent": 2, "failed": 1, "aborted": 0}]


@pytest.mark.slow
async def test_an_aborted_newsletter_calls_back_once_with_the_aborted_count(
    served: ApiClient, smtp: tuple[RecordingSmtpHandler, int], redis: ArqRedis
) -> None:
    """Aborted while sending: its fan-out stops (the job is cancelled), the queued messages are
    skipped and count themselves aborted, the never-enqueued ones are counted by the abort."""
    handler = smtp[0]
    handler.gate.clear()  # every message waits in the server until the test lets it through
    total = 1200  # three fan-out chunks: the abort comes before the last ones are enqueued
    accepted = await post_newsletter(
        served, newsletter(total, callback={"type": "newsletter_done"})
    )
    newsletter_id = accepted["job_id"]

    async def sending() -> bool:  # messages held at the gate: the fan-out has begun
        return handler.in_data > 0

    await wait_for(sending, timeout=15, what="messages to be sent")
    aborted = await served.delete(f"/jobs/{newsletter_id}")
    assert aborted.status == 202, await aborted.text()
    handler.gate.set()
    end = await wait_job(served, accepted["callback_job_id"], timeout=60)
    assert end["status"] == "complete", end
    assert len(runs) == 1
    summary = runs[0]["batch"]
    counts = summary["counts"]
    assert summary["total"] == total and sum(counts.values()) == total, summary
    assert counts["aborted"] > 0 and counts["failed"] == 0, counts
    assert counts["sent"] <= len(handler.messages)  # a message sent as the abort came counts sent
    await asyncio.sleep(0.5)
    assert len(runs) == 1


@pytest.mark.slow
@pytest.mark.parametrize("how", ["api", "dashboard bulk"])
async def test_one_message_aborted_on_its_own_is_counted_and_the_callback_runs(
    served: ApiClient, smtp: tuple[RecordingSmtpHandler, int], redis: ArqRedis, how: str
) -> None:
    """`DELETE /jobs/<newsletter>-<n>` (or the dashboard's bulk abort) of one queued message:
    it never runs, so it records nothing itself; the abort counts it, and the callback does
    not wait for it for ever."""
    handler = smtp[0]
    handler.data_delay = 0.2  # 10 jobs at a time: the last messages wait in the queue
    callback = {"type": "newsletter_done", "body": {"label": "one aborted"}}
    accepted = await post_newsletter(served, newsletter(40, callback=callback))
    last = child_job_id(accepted["job_id"], 39)

    async def queued() -> bool:
        response = await served.get(f"/jobs/{last}")
        return response.status == 200 and (await response.json())["status"] == "queued"

    await wait_for(queued, timeout=30, what="the last message's job, queued")
    if how == "api":
        assert (await served.delete(f"/jobs/{last}")).status == 202
    else:
        assert (await abort_queued(redis, default_queue_name, [last])).done == 1
    end = await wait_job(served, accepted["callback_job_id"], timeout=60)
    assert end["status"] == "complete", end
    counts = {"sent": 39, "failed": 0, "aborted": 1}
    assert [run["batch"]["counts"] for run in runs] == [counts]
    assert len(handler.messages) == 39


@pytest.mark.slow
async def test_a_newsletter_aborted_before_it_runs_calls_back_with_all_aborted(
    served: ApiClient, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    """Its job never runs (aborted while deferred): the abort itself settles every recipient."""
    body = newsletter(4, callback={"type": "newsletter_done"}, delay_seconds=3600)
    accepted = await post_newsletter(served, body)
    aborted = await served.delete(f"/jobs/{accepted['job_id']}")
    assert aborted.status == 202, await aborted.text()
    end = await wait_job(served, accepted["callback_job_id"], timeout=30)
    assert end["status"] == "complete", end
    assert [run["batch"]["counts"] for run in runs] == [{"sent": 0, "failed": 0, "aborted": 4}]
    assert smtp[0].messages == []


@pytest.mark.slow
async def test_the_callback_waits_and_says_for_what(
    served: ApiClient, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    smtp[0].gate.clear()
    accepted = await post_newsletter(served, newsletter(3, callback={"type": "newsletter_done"}))
    view = await (await served.get(f"/jobs/{accepted['callback_job_id']}")).json()
    assert view["status"] == "waiting", view
    waiting = view["waiting_for"]
    assert waiting["kind"] == "callback" and waiting["batch_id"] == accepted["job_id"]
    assert waiting["total"] == 3 and waiting["pending"] == 3
    smtp[0].gate.set()
    end = await wait_job(served, accepted["callback_job_id"], timeout=30)
    assert end["status"] == "complete", end


async def test_a_bad_callback_is_a_422_before_anything_is_stored(
    declared: None, make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    async with api_and_worker(make_settings()) as api:  # no WEBHOOK_SECRET
        cases: list[tuple[Any, str]] = [
            ({}, "give one of 'url' or 'type'"),
            ({"type": "no_such_type"}, "no job type"),
            ({"type": "export"}, "no job type 'export'"),
            ({"url": "http://127.0.0.1:9/x"}, "WEBHOOK_SECRET"),
            ({"type": "newsletter_done", "extra": 1}, "extra"),
        ]
        for callback, says in cases:
            text = await post_newsletter(api, newsletter(2, callback=callback), status=422)
            assert says.lower() in text.lower(), (callback, text)
    assert not [key async for key in redis.scan_iter("arq:job:*")]  # nothing was enqueued
    assert not [key async for key in redis.scan_iter("asyncjobs:batch:*")]


@pytest.mark.slow
async def test_the_callback_is_charged_as_a_batch_s_is(
    declared: None,
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    smtp: tuple[RecordingSmtpHandler, int],
) -> None:
    """An email callback's recipients count against the hourly quota with the newsletter's."""
    settings = make_settings(mail_messages_per_hour=5, newsletter_max_recipients=5)
    email = {"to": ["a@example.com", "b@example.com"], "subject": "Done", "text": "Sent"}
    async with api_and_worker(settings) as api:
        body = newsletter(4, callback={"type": "email", "body": email})
        text = await post_newsletter(api, body, status=422)  # 6 messages: never fits in 5
        assert "6" in text, text
        accepted = await post_newsletter(
            api, newsletter(3, callback={"type": "email", "body": email})
        )
        end = await wait_job(api, accepted["callback_job_id"], timeout=30)
        assert end["status"] == "complete", end
    subjects = sorted(m.message["Subject"] for m in smtp[0].messages)
    assert subjects == ["Done", "News", "News", "News"]


async def test_recording_twice_counts_once_and_releases_once(redis: ArqRedis) -> None:
    """The script alone: a message recorded again (a re-run after a kill) or moved from failed
    to sent adds nothing; "aborted" does not override an outcome; the callback is put in the
    queue once, by the call that records the last recipient, with the counts."""
    callback = FollowUp("newsletter_done", {}, argument="batch")
    callback_id = await enqueue_counted_callback(redis, "nl", 4, callback, BATCH_OUTCOMES)
    await start_progress(redis, "nl", 4, 3600, "a@example.com", callback_id)
    ids = [f"<nl.{n}@example.com>" for n in range(4)]

    async def record(outcome: BatchOutcome, *n: int) -> None:
        await count_in_batch(redis, "nl", [ids[i] for i in n], outcome, 3600)

    async def queued() -> bool:
        return await redis.zscore("arq:queue", callback_id) is not None

    await record("failed", 0)
    await record("failed", 0)
    await record("sent", 0)  # a dead letter's retry reached it: sent, no longer failed
    await record("sent", 1)
    await record("aborted", 1)  # sent already: stays sent
    waits = await read_waits(redis, callback_id)
    assert waits is not None and (waits.state, waits.pending) == ("waiting", 2)
    assert not await queued()
    await record("failed", 2)
    await record("sent", 2)
    assert not await queued()  # 3 of 4 settled
    assert await settle_rest(redis, "nl", "aborted") == 1  # the last one: never enqueued
    assert await queued()
    waits = await read_waits(redis, callback_id)
    assert waits is not None and waits.state == "released"
    assert waits.counts == {"sent": 3, "failed": 0, "aborted": 1}
    await redis.zrem("arq:queue", callback_id)
    await record("sent", 3)  # a message that went as the abort came: counts move, no release
    assert not await queued()
    assert await settle_rest(redis, "nl", "aborted") == 0
