"""Effectively-once email over at-least-once jobs, Idempotency-Key, dead letters, newsletters."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.worker import Worker

from jobs.deadletter import get_dead_letter
from tests.helpers import ApiClient, wait_for
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler

EMAIL = {"to": "a@example.com", "subject": "s", "text": "t"}


async def test_rerun_of_a_sent_email_does_not_send_again(
    redis: ArqRedis, worker: Worker, api: ApiClient, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    """Two runs of the same message (what arq does after a crash) deliver it once."""
    kwargs: dict[str, Any] = {"email": EMAIL | {"to": ["a@example.com"]}, "message_id": "<m1@x>"}
    first = await redis.enqueue_job("send_email", **kwargs)
    assert first is not None
    assert (await wait_job(api, first.job_id))["status"] == "complete"
    second = await redis.enqueue_job("send_email", **kwargs)
    assert second is not None
    result = (await wait_job(api, second.job_id))["result"]
    assert result == {"message_id": "<m1@x>", "skipped": "already sent"}
    assert smtp[0].message_ids() == ["<m1@x>"]


async def test_idempotency_key_returns_the_same_job(
    api: ApiClient, redis: ArqRedis, worker: Worker, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    headers = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
    responses = [await api.post("/jobs/email", json=EMAIL, headers=headers) for _ in range(3)]
    bodies = [await r.json() for r in responses]
    assert [r.status for r in responses] == [202, 202, 202]
    assert bodies[0] == bodies[1] == bodies[2]
    assert "Idempotent-Replayed" not in responses[0].headers
    assert responses[1].headers["Idempotent-Replayed"] == "true"
    await wait_job(api, bodies[0]["job_id"])
    assert len(smtp[0].messages) == 1

    different = await api.post("/jobs/email", json=EMAIL | {"subject": "other"}, headers=headers)
    assert different.status == 422
    assert "different request" in (await different.json())["message"]


async def test_idempotency_key_after_a_rejected_request_can_be_used_again(api: ApiClient) -> None:
    headers = {"Idempotency-Key": "k-1"}
    bad = await api.post("/jobs/email", json=EMAIL | {"to": "nope"}, headers=headers)
    assert bad.status == 422
    good = await api.post("/jobs/email", json=EMAIL | {"to": "nope@example.com"}, headers=headers)
    assert good.status == 202
    long_key = await api.post("/jobs/email", json=EMAIL, headers={"Idempotency-Key": "x" * 256})
    assert long_key.status == 400


async def test_concurrent_requests_with_one_key_enqueue_once(
    api: ApiClient, redis: ArqRedis
) -> None:
    headers = {"Idempotency-Key": "same"}
    responses = await asyncio.gather(
        *(api.post("/jobs/email", json=EMAIL, headers=headers) for _ in range(10))
    )
    statuses = sorted(r.status for r in responses)
    assert set(statuses) <= {202, 409} and 202 in statuses
    assert await redis.zcard("arq:queue") == 1


async def test_dead_letter_api_lists_retries_and_deletes(
    api: ApiClient, worker: Worker, redis: ArqRedis, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    handler, _ = smtp
    handler.refuse_rcpt = {"gone@example.com"}
    job_ids = []
    for i in range(3):
        response = await api.post(
            "/jobs/email", json=EMAIL | {"to": "gone@example.com", "subject": f"n{i}"}
        )
        job_ids.append((await response.json())["job_id"])
    for job_id in job_ids:
        assert (await wait_job(api, job_id))["status"] == "failed"

    page = await (await api.get("/dead-letter?limit=2")).json()
    assert page["total"] == 3 and len(page["items"]) == 2
    rest = await (await api.get("/dead-letter?offset=2&limit=2")).json()
    assert len(rest["items"]) == 1
    listed = {item["id"] for item in page["items"] + rest["items"]}
    assert listed == set(job_ids)
    entry = await (await api.get(f"/dead-letter/{job_ids[0]}")).json()
    assert entry["reason"] == "permanent" and entry["tries"] == 1
    assert "550" in entry["error"]
    assert (await api.get("/dead-letter?limit=0")).status == 400

    assert (await api.delete(f"/dead-letter/{job_ids[1]}")).status == 204
    assert (await api.delete(f"/dead-letter/{job_ids[1]}")).status == 404

    handler.refuse_rcpt = set()  # the mailbox exists again
    retried = await api.post(f"/dead-letter/{job_ids[0]}/retry")
    assert retried.status == 202
    new_job = (await retried.json())["job_id"]
    assert new_job != job_ids[0]
    status = await wait_job(api, new_job)
    assert status["status"] == "complete" and status["tries"] == 1
    assert [m.message["Subject"] for m in handler.messages] == ["n0"]
    assert await get_dead_letter(redis, job_ids[0]) is None
    assert (await api.post(f"/dead-letter/{job_ids[0]}/retry")).status == 404


@pytest.mark.slow
async def test_newsletter_fans_out_renders_and_reports_progress(
    api: ApiClient, worker: Worker, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    handler, _ = smtp
    handler.refuse_rcpt = {"bounce@example.com"}
    recipients: list[Any] = [
        {"email": f"r{i}@example.com", "vars": {"name": f"Reader {i}"}} for i in range(40)
    ]
    recipients += ["bounce@example.com", "plain@example.com"]
    body = {
        "recipients": recipients,
        "subject": "News for {{ name | default('you') }}",
        "text": "Hello {{ name | default(email) }}",
        "html": "<p>Hello {{ name }}</p>",
    }
    response = await api.post("/jobs/newsletter", json=body)
    assert response.status == 202
    accepted = await response.json()
    assert accepted["recipients"] == 42

    async def settled() -> dict[str, Any] | None:
        view: dict[str, Any] = await (await api.get(accepted["status_url"])).json()
        progress = view.get("progress")
        return view if progress and progress["pending"] == 0 else None

    view = await wait_for(settled, timeout=30, what="all newsletter messages to settle")
    assert view["status"] == "complete"
    assert view["progress"] == {"total": 42, "sent": 41, "failed": 1, "pending": 0, "aborted": 0}
    by_rcpt = {m.rcpt_tos[0]: m.message for m in handler.messages}
    assert len(handler.messages) == 41
    assert by_rcpt["r7@example.com"]["Subject"] == "News for Reader 7"
    html = by_rcpt["r7@example.com"].get_body(("html",))
    assert html is not None and "<p>Hello Reader 7</p>" in html.get_content()
    plain = by_rcpt["plain@example.com"].get_body(("plain",))
    assert plain is not None and plain.get_content().strip() == "Hello plain@example.com"


@pytest.mark.parametrize(
    ("field", "template"),
    [
        ("text", "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}"),
        ("html", "{% if a %}" * 3000 + "x" + "{% endif %}" * 3000),
        ("text", "{{ " + "[" * 1500 + "]" * 1500 + " }}"),
    ],
    ids=["parentheses", "blocks", "lists"],
)
@pytest.mark.slow
async def test_a_template_nested_thousands_deep_is_a_422_naming_the_field(
    api: ApiClient, field: str, template: str
) -> None:
    """Jinja2 recurses once per level: a template 3,000 deep was a RecursionError and a 500
    with a 100 KB traceback in the log."""
    body = {"recipients": ["a@example.com"], "subject": "s", "text": "t"} | {field: template}
    response = await api.post("/jobs/newsletter", json=body)
    assert response.status == 422
    [detail] = (await response.json())["details"]
    assert detail["field"] == field and "nests too deeply" in detail["message"]


@pytest.mark.slow
async def test_newsletter_html_is_escaped_and_templates_validated(
    api: ApiClient, worker: Worker, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    bad = await api.post(
        "/jobs/newsletter",
        json={"recipients": ["a@example.com"], "subject": "{{ oops", "text": "t"},
    )
    assert bad.status == 422
    assert (await bad.json())["details"][0]["field"] == "subject"
    body = {
        "recipients": [{"email": "a@example.com", "vars": {"name": "<script>x</script>"}}],
        "subject": "Hi",
        "html": "<p>{{ name }}</p>",
    }
    accepted = await (await api.post("/jobs/newsletter", json=body)).json()

    async def delivered() -> bool:
        return len(smtp[0].messages) == 1

    await wait_for(delivered, what="the newsletter message")
    html = smtp[0].messages[0].message.get_body(("html",))
    assert html is not None and "&lt;script&gt;" in html.get_content()
    assert accepted["recipients"] == 1
