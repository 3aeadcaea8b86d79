"""Addresses a deployment uses: dotless domains when allowed, a default sender that passes the
service's own rules, and each recipient once however often a request names it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from arq.worker import Worker

from app.web import create_app
from asyncjobs.addresses import check_address, unique_addresses
from asyncjobs.settings import Settings
from tests.conftest import start_worker, stop_worker
from tests.helpers import ApiClient, api_client, wait_for
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler

EMAIL = {"subject": "s", "text": "t"}


def test_the_default_sender_passes_the_services_own_rules() -> None:
    settings = Settings(_env_file=None)
    assert check_address(settings.mail_from, settings.mail_allow_local_domains)
    with pytest.raises(ValueError, match="MAIL_ALLOW_LOCAL_DOMAINS"):
        Settings(_env_file=None, mail_from="me@localhost")  # refused at start, not per message
    local = Settings(_env_file=None, mail_from="me@localhost", mail_allow_local_domains=True)
    assert local.mail_from == "me@localhost"


def test_dotless_domains_only_when_allowed_and_still_checked() -> None:
    assert check_address("Ops@MailHost", allow_local_domains=True) == "Ops@mailhost"
    for bad in ("a b@localhost", "a..b@localhost", "a@-host", "a@local_host", "@localhost"):
        with pytest.raises(ValueError):
            check_address(bad, allow_local_domains=True)
    with pytest.raises(ValueError, match="should have a period"):
        check_address("a@localhost")


def test_duplicates_are_removed_with_the_domain_compared_without_case() -> None:
    addresses = ["a@Example.COM", "a@example.com", "A@example.com", "b@example.com"]
    assert unique_addresses(addresses) == ["a@Example.COM", "A@example.com", "b@example.com"]


async def test_localhost_is_a_422_by_default_and_delivered_when_allowed(
    api: ApiClient,
    make_settings: Callable[..., Settings],
    smtp: tuple[RecordingSmtpHandler, int],
) -> None:
    refused = await api.post("/jobs/email", json=EMAIL | {"to": "me@localhost"})
    assert refused.status == 422
    details = {d["field"]: d["message"] for d in (await refused.json())["details"]}
    assert "MAIL_ALLOW_LOCAL_DOMAINS" in details["to.0"], details

    settings = make_settings(mail_allow_local_domains=True, mail_from="jobs@localhost")
    worker, task = await start_worker(settings)
    try:
        async with api_client(create_app(settings)) as local_api:
            response = await local_api.post("/jobs/email", json=EMAIL | {"to": "me@localhost"})
            assert response.status == 202, await response.text()
            status = await wait_job(local_api, (await response.json())["job_id"])
    finally:
        await stop_worker(worker, task)
    assert status["status"] == "complete", status
    [mail] = smtp[0].messages
    assert (mail.mail_from, mail.rcpt_tos) == ("jobs@localhost", ["me@localhost"])


async def test_each_recipient_is_sent_once_across_to_cc_and_bcc(
    api: ApiClient, worker: Worker, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    body = EMAIL | {
        "to": ["x@example.com"] * 40 + ["x@EXAMPLE.com", "y@example.com"],
        "cc": ["y@example.com", "z@example.com"],
        "bcc": ["x@example.com", "z@Example.com", "w@example.com"],
    }
    response = await api.post("/jobs/email", json=body)
    assert response.status == 202, await response.text()
    status = await wait_job(api, (await response.json())["job_id"])
    assert status["status"] == "complete"
    [mail] = smtp[0].messages
    assert mail.rcpt_tos == ["x@example.com", "y@example.com", "z@example.com", "w@example.com"]
    assert mail.message["To"] == "x@example.com, y@example.com"
    assert mail.message["Cc"] == "z@example.com"


@pytest.mark.slow
async def test_a_newsletter_sends_each_address_once(
    api: ApiClient, worker: Worker, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    recipients: list[Any] = [{"email": "r@example.com", "vars": {"n": 1}}]
    recipients += [{"email": "r@EXAMPLE.COM", "vars": {"n": 2}}] * 500 + ["s@example.com"]
    body = {"recipients": recipients, "subject": "Hi {{ n }}", "text": "t"}
    response = await api.post("/jobs/newsletter", json=body)
    assert response.status == 202, await response.text()
    assert (await response.json())["recipients"] == 2

    async def both_sent() -> bool:
        return len(smtp[0].messages) >= 2

    await wait_for(both_sent, what="the two messages")
    status = await wait_job(api, (await response.json())["job_id"])
    assert status["progress"]["total"] == 2, status
    assert sorted(m.rcpt_tos[0] for m in smtp[0].messages) == ["r@example.com", "s@example.com"]
    first = next(m for m in smtp[0].messages if m.rcpt_tos == ["r@example.com"])
    assert first.message["Subject"] == "Hi 1"  # the first entry's vars


async def test_a_recipient_whose_variables_break_the_template_fails_alone(
    api: ApiClient, worker: Worker, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    recipients = [{"email": f"r{d}@example.com", "vars": {"d": d}} for d in (1, 0, 2)]
    body = {"recipients": recipients, "subject": "s", "text": "{{ 10 // d }}"}
    response = await api.post("/jobs/newsletter", json=body)
    assert response.status == 202, await response.text()
    job_id = (await response.json())["job_id"]

    async def settled() -> dict[str, Any] | None:
        view: dict[str, Any] = await (await api.get(f"/jobs/{job_id}")).json()
        progress = view.get("progress")
        return view if progress and progress["pending"] == 0 else None

    view = await wait_for(settled, what="the newsletter to settle")
    assert view["progress"] == {"total": 3, "sent": 2, "failed": 1, "pending": 0, "aborted": 0}
    assert sorted(m.rcpt_tos[0] for m in smtp[0].messages) == ["r1@example.com", "r2@example.com"]
    [invalid] = view["result"]["invalid"]
    assert invalid.startswith("r0@example.com: template failed: ZeroDivisionError"), invalid


@pytest.mark.slow
async def test_a_newsletter_is_in_progress_until_its_last_message_is_sent(
    api: ApiClient, worker: Worker, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    """Progress from the 202 on, and never `complete` while a message is pending: the job that
    fans out ends long before the messages it enqueued are sent."""
    smtp[0].data_delay = 0.02  # 60 messages over 10 connections: over 100 ms of sending
    recipients = [f"r{i}@example.com" for i in range(60)]
    response = await api.post(
        "/jobs/newsletter", json={"recipients": recipients, "subject": "s", "text": "t"}
    )
    assert response.status == 202
    status_url = (await response.json())["status_url"]
    first: dict[str, Any] = await (await api.get(status_url)).json()
    assert first["progress"]["total"] == 60, first  # there from the first request on
    phases = set()

    async def done() -> dict[str, Any] | None:
        view: dict[str, Any] = await (await api.get(status_url)).json()
        if view["progress"]["pending"] > 0:
            assert view["status"] != "complete", view
            if view["status"] == "in_progress":
                phases.add(view["phase"])
        return view if view["status"] == "complete" else None

    view = await wait_for(done, interval=0.005, what="the newsletter to complete")
    assert view["progress"] == {"total": 60, "sent": 60, "failed": 0, "pending": 0, "aborted": 0}
    assert view["phase"] is None
    assert "sending" in phases, phases
