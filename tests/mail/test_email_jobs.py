"""Email jobs end to end: API -> Redis -> real arq worker -> real SMTP server on loopback."""

from __future__ import annotations

from collections.abc import Callable
from email import message_from_bytes, policy
from email.message import EmailMessage, Message
from email.mime.text import MIMEText

import pytest
from aiosmtplib.email import flatten_message
from arq.connections import ArqRedis

from asyncjobs.settings import Settings
from jobs.deadletter import DeadLetter, get_dead_letter
from jobs.mail.email import EmailSpec, _text_part, build_message
from jobs.mail.smtp import message_bytes
from tests.conftest import start_worker, stop_worker
from tests.helpers import ApiClient, wait_for
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler


async def test_email_with_text_and_html_arrives_with_both_parts(
    api: ApiClient, worker: object, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    payload = {
        "to": ["alice@example.com", "bob@example.org"],
        "cc": "carol@example.net",
        "subject": "Your order — confirmed",
        "text": "Plain body",
        "html": "<p>HTML <b>body</b></p>",
        "from": "shop@example.com",
        "reply_to": "help@example.com",
        "headers": {"X-Campaign": "welcome"},
    }
    response = await api.post("/jobs/email", json=payload)
    assert response.status == 202
    accepted = await response.json()
    assert accepted["status_url"] == f"/jobs/{accepted['job_id']}"

    status = await wait_job(api, accepted["job_id"])
    assert status["status"] == "complete", status
    assert status["function"] == "send_email"
    assert status["tries"] == 1
    assert status["result"]["accepted"] == [
        "alice@example.com", "bob@example.org", "carol@example.net"
    ]  # fmt: skip

    handler, _ = smtp
    assert len(handler.messages) == 1
    received = handler.messages[0]
    assert received.mail_from == "shop@example.com"
    assert sorted(received.rcpt_tos) == [
        "alice@example.com",
        "bob@example.org",
        "carol@example.net",
    ]
    message = received.message
    assert message["Subject"] == "Your order — confirmed"
    assert message["Reply-To"] == "help@example.com"
    assert message["X-Campaign"] == "welcome"
    assert message["Message-ID"] == accepted["message_id"]
    assert message.get_content_type() == "multipart/alternative"
    plain = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert plain is not None and plain.get_content().strip() == "Plain body"
    assert html is not None and html.get_content().strip() == "<p>HTML <b>body</b></p>"


async def test_bcc_recipients_get_mail_but_no_header(
    api: ApiClient, worker: object, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    response = await api.post(
        "/jobs/email",
        json={"to": "a@example.com", "bcc": ["hidden@example.com"], "subject": "s", "text": "t"},
    )
    status = await wait_job(api, (await response.json())["job_id"])
    assert status["status"] == "complete"
    received = smtp[0].messages[0]
    assert "hidden@example.com" in received.rcpt_tos
    assert "Bcc" not in received.message
    assert "hidden@example.com" not in received.message.as_string()


async def test_smtp_5xx_fails_the_job_with_the_server_reply(
    api: ApiClient, worker: object, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    smtp[0].reject_with = "550 5.1.1 Mailbox unavailable"
    response = await api.post(
        "/jobs/email", json={"to": "x@example.com", "subject": "s", "text": "t"}
    )
    status = await wait_job(api, (await response.json())["job_id"])
    assert status["status"] == "failed"
    assert "PermanentJobError" in status["error"]
    assert "550" in status["error"] and "Mailbox unavailable" in status["error"]


def test_html_only_message_is_single_part() -> None:
    spec = EmailSpec.model_validate({"to": "a@example.com", "subject": "s", "html": "<p>x</p>"})
    message = build_message(spec, "noreply@example.com", "<id@example.com>")
    assert message.get_content_type() == "text/html"
    assert message["From"] == "noreply@example.com"


def _sent_form(message: Message) -> EmailMessage:
    """The message as the SMTP server receives it, parsed back with the modern parser."""
    parsed = message_from_bytes(message_bytes(message), policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def test_non_ascii_headers_and_bodies_are_encoded_and_read_back() -> None:
    spec = EmailSpec.model_validate({
        "to": "a@example.com", "subject": "Grüße — " + "long subject " * 30,
        "text": "héllo", "html": "<p>héllo</p>", "headers": {"X-Note": "ça va"},
    })  # fmt: skip
    raw = message_bytes(build_message(spec, "noreply@example.com", "<id@example.com>"))
    assert raw.isascii()  # RFC 2047 words and base64 bodies: nothing needs SMTPUTF8
    assert max(len(line) for line in raw.splitlines()) <= 78  # long headers are folded
    received = _sent_form(build_message(spec, "noreply@example.com", "<id@example.com>"))
    assert received["Subject"] == spec.subject
    assert received["X-Note"] == "ça va"
    plain, html = received.get_body(("plain",)), received.get_body(("html",))
    assert plain is not None and plain.get_content() == "héllo"
    assert html is not None and html.get_content() == "<p>héllo</p>"


def test_many_recipients_fold_into_short_lines() -> None:
    to = [f"reader{n}@example.com" for n in range(200)]
    spec = EmailSpec.model_validate({"to": to, "subject": "s", "text": "t"})
    raw = message_bytes(build_message(spec, "noreply@example.com", "<id@example.com>"))
    assert max(len(line) for line in raw.splitlines()) <= 998  # SMTP's line limit
    received = _sent_form(build_message(spec, "noreply@example.com", "<id@example.com>"))
    assert [a.addr_spec for a in received["To"].addresses] == to


def test_an_internationalized_address_is_written_by_the_modern_email_package() -> None:
    spec = EmailSpec.model_validate({"to": "zoë@example.com", "subject": "s", "text": "t"})
    message = build_message(spec, "noreply@example.com", "<id@example.com>")
    assert isinstance(message, EmailMessage)
    assert message["To"] == "zoë@example.com"


def test_smtp_bytes_are_the_email_packages_own_with_crlf() -> None:
    """message_bytes skips compat32's folding only where folding would change nothing."""
    spec = EmailSpec.model_validate({
        "to": [f"reader{n}@example.com" for n in range(30)], "cc": "c@example.com",
        "subject": "Grüße " + "word " * 40, "text": "plain\nbody", "html": "<p>x</p>",
        "headers": {"X-Short": "v", "X-Long": "y " * 60},
    })  # fmt: skip
    message = build_message(spec, "noreply@example.com", "<id@example.com>")
    ours = message_bytes(message)
    theirs = flatten_message(message)  # aiosmtplib: the email package's compat32 generator
    assert b"\r\n" in ours and b"\n" not in ours.replace(b"\r\n", b"")
    assert ours == theirs.replace(b"\n", b"\r\n")


@pytest.mark.parametrize(
    "body",
    ["hello", "", "café " * 100, "line\nFrom me\n.dot\n", "☃", "x" * 2000, "a\r\nb", "ünï\n" * 50],
)
@pytest.mark.parametrize("subtype", ["plain", "html"])
def test_a_text_part_is_the_one_mimetext_makes(body: str, subtype: str) -> None:
    """The cheap text part is checked against the email package's own, byte for byte."""
    charset = "us-ascii" if body.isascii() else "utf-8"
    assert _text_part(body, subtype).as_bytes() == MIMEText(body, subtype, charset).as_bytes()


def test_headers_a_sender_sets_are_allowed_by_name() -> None:
    headers = {
        "X-Campaign": "spring",
        "List-Unsubscribe": "<mailto:unsub@example.com>",
        "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        "Precedence": "bulk",
        "Auto-Submitted": "auto-generated",
        "In-Reply-To": "<a@example.com>",
        "References": "<a@example.com>",
    }
    spec = EmailSpec.model_validate(
        {"to": "a@example.com", "subject": "s", "text": "t", "headers": headers}
    )
    assert spec.headers == headers


async def test_plain_arq_producers_get_the_apis_rules(
    redis: ArqRedis, make_settings: Callable[..., Settings], smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    """An email enqueued with arq's own enqueue_job is checked by the worker with the API's
    limits: 120 recipients (the API caps at 50) and a sender domain the settings do not allow
    both fail for good, and nothing is sent."""
    settings = make_settings(mail_allowed_sender_domains=["example.com"])
    worker, task = await start_worker(settings)
    many = {"to": [f"r{n}@example.com" for n in range(120)], "subject": "s", "text": "t"}
    other = {"to": ["a@example.com"], "subject": "s", "text": "t", "from": "x@evil.example.org"}
    try:
        ids = []
        for n, email in enumerate((many, other)):
            job = await redis.enqueue_job("send_email", email=email, message_id=f"<m{n}@x>")
            assert job is not None
            ids.append(job.job_id)

        async def both_dead() -> list[DeadLetter] | None:
            entries = [await get_dead_letter(redis, job_id) for job_id in ids]
            return [e for e in entries if e is not None] if all(entries) else None

        entries = await wait_for(both_dead, what="both emails in the dead-letter store")
    finally:
        await stop_worker(worker, task)
    assert [e.reason for e in entries] == ["permanent", "permanent"]
    assert "120 recipients is more than the limit of 50" in entries[0].error
    assert "sender domain 'evil.example.org' is not allowed" in entries[1].error
    assert smtp[0].messages == []
