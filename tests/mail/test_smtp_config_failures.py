"""SMTP configuration failures (a wrong password, a certificate the worker cannot verify, a
MAIL_FROM the server refuses) against real SMTP servers on loopback: every email waits and
retries instead of being dead-lettered, and the worker is loud about it without flooding its
log: the job's error names the setting, an ERROR line at start-up, at most one line a minute
per problem, `/health` degraded with the reason until a send works."""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trustme
from arq.connections import ArqRedis

from app.mailsink import server_port, start_smtp_server
from asyncjobs.keys import SMTP_PROBLEM_KEY
from asyncjobs.settings import Settings
from jobs.mail.email import EmailSpec, build_message
from jobs.mail.smtp import SmtpPool
from jobs.mail.smtpconfig import SmtpConfigError, SmtpProblems
from tests.conftest import api_and_worker
from tests.helpers import ApiClient, wait_for
from tests.jobwait import wait_job
from tests.mail.test_smtp_outcomes import post_email, retrying
from tests.servers import RecordingSmtpHandler, start_auth_smtp_server

Smtp = tuple[RecordingSmtpHandler, int]
SPEC = EmailSpec.model_validate({"to": "a@example.com", "subject": "s", "text": "t"})


@pytest.fixture
async def auth_smtp() -> AsyncIterator[Smtp]:
    """A server that wants AUTH with the password "right" before it takes MAIL."""
    handler = RecordingSmtpHandler(password="right")
    server = await start_auth_smtp_server(handler)
    try:
        yield handler, server_port(server)
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def tls_smtp() -> AsyncIterator[Smtp]:
    """A server that requires STARTTLS, with a certificate of a CA the worker does not know."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1", "localhost").configure_cert(context)
    handler = RecordingSmtpHandler()
    server = await start_smtp_server(handler, tls=context)
    try:
        yield handler, server_port(server)
    finally:
        server.close()
        await server.wait_closed()


def loud_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    """The worker's lines at WARNING or above that mention `text`."""
    return [
        r
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.startswith("jobs") and text in r.getMessage()
    ]


async def health(api: ApiClient) -> dict[str, Any]:
    body: dict[str, Any] = await (await api.get("/health")).json()
    return body


async def healthy(api: ApiClient) -> dict[str, Any] | None:
    body = await health(api)
    return body if body["status"] == "ok" else None


async def test_a_wrong_password_keeps_emails_waiting_loudly_until_it_is_fixed(
    auth_smtp: Smtp,
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    caplog: pytest.LogCaptureFixture,
    fault_report: Callable[[str], None],
) -> None:
    handler, port = auth_smtp
    settings = make_settings(smtp_port=port, smtp_username="jobs", smtp_password="wrong")
    with caplog.at_level(logging.INFO):
        async with api_and_worker(settings) as api:

            async def start_up_error() -> list[logging.LogRecord]:
                return loud_lines(caplog, "SMTP authentication failed (535")

            [line] = await wait_for(start_up_error, what="the start-up check's line")
            assert line.levelno == logging.ERROR and "SMTP_USERNAME/SMTP_PASSWORD" in line.message
            sent = [await post_email(api, [f"r{i}@example.com"]) for i in range(3)]
            for job_id, _ in sent:  # each waits and retries, saying why
                view = await wait_for(retrying(api, job_id, tries=4), what="four tries")
                assert view["error"].startswith("SMTP authentication failed (535 5.7.8")
                assert view["error"].endswith("check SMTP_USERNAME/SMTP_PASSWORD")
            body = await health(api)
            assert body["status"] == "degraded" and body["worker"]["alive"], body
            assert body["smtp"]["reason"].startswith("SMTP authentication failed (535"), body
            assert await redis.zcard("asyncjobs:dead") == 0
            assert handler.messages == []
            # one line in the log for all those failures: the start-up check's
            assert loud_lines(caplog, "authentication") == [line]
            failed_logins = handler.auth_attempts

            handler.password = "wrong"  # the server now takes the worker's password
            views = [await wait_job(api, job_id) for job_id, _ in sent]
            assert "smtp" not in await wait_for(lambda: healthy(api), what="/health ok again")
    assert [v["status"] for v in views] == ["complete"] * 3
    assert sorted(handler.message_ids()) == sorted(message_id for _, message_id in sent)
    tries = sum(v["tries"] for v in views)
    fault_report(
        f"SMTP 535: 3 emails waited {tries - 3} failed tries ({failed_logins} refused "
        f"logins) with 1 log line, then were delivered once each"
    )


async def test_an_unverifiable_certificate_is_retried_with_the_reason_and_degrades_health(
    tls_smtp: Smtp, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    handler, port = tls_smtp
    with caplog.at_level(logging.INFO):
        async with api_and_worker(make_settings(smtp_port=port)) as api:

            async def start_up_error() -> list[logging.LogRecord]:
                return loud_lines(caplog, "TLS certificate verification")

            [line] = await wait_for(start_up_error, what="the start-up check's line")
            job_id, _ = await post_email(api, ["a@example.com"])
            view = await wait_for(retrying(api, job_id, tries=3), what="three tries")
            body = await health(api)
    assert line.levelno == logging.ERROR and "SMTP_TLS_CA_FILE" in line.message
    assert view["error"].startswith("TLS certificate verification of 127.0.0.1 failed")
    assert "CERTIFICATE_VERIFY_FAILED" in view["error"] and "SMTP_TLS_CA_FILE" in view["error"]
    assert body["status"] == "degraded" and "SMTP_TLS_CA_FILE" in body["smtp"]["reason"]
    assert loud_lines(caplog, "TLS certificate verification") == [line]  # none per try
    assert handler.messages == []


async def test_mail_from_refused_waits_but_a_callers_own_sender_is_refused_for_good(
    api: ApiClient, worker: Any, smtp: Smtp, settings: Settings, redis: ArqRedis
) -> None:
    handler, _ = smtp
    handler.refuse_sender = {settings.mail_from, "news@example.com"}
    job_id, message_id = await post_email(api, ["a@example.com"])
    view = await wait_for(retrying(api, job_id, tries=3), what="three tries")
    assert view["error"].startswith(f"the SMTP server refused the sender {settings.mail_from}")
    assert "553" in view["error"] and "check MAIL_FROM" in view["error"]
    assert (await health(api))["smtp"]["reason"] == view["error"]

    # a caller's own `from` refused is about that message: dead-lettered at once, as before
    response = await api.post(
        "/jobs/email",
        json={"to": "b@example.com", "from": "news@example.com", "subject": "s", "text": "t"},
    )
    own = await wait_job(api, (await response.json())["job_id"])
    assert own["status"] == "failed" and own["tries"] == 1 and "553" in own["error"], own

    handler.refuse_sender = set()  # the account may send as MAIL_FROM now
    assert (await wait_job(api, job_id))["status"] == "complete"
    assert handler.message_ids() == [message_id]
    assert await wait_for(lambda: healthy(api), what="/health ok again")


async def test_the_same_problem_is_told_again_after_a_minute_with_what_was_not_told(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    problems = SmtpProblems(None, clock=lambda: now[0])
    wrong = SmtpConfigError("auth", "SMTP authentication failed (535 ...)")
    with caplog.at_level(logging.WARNING, logger="jobs.mail.smtpconfig"):
        for moment in (0.0, 1.0, 30.0, 59.9, 60.1, 61.0, 119.0):
            now[0] = moment
            await problems.failed(wrong)
        await problems.failed(SmtpConfigError("tls", "TLS certificate verification failed"))
    assert caplog.messages == [
        "SMTP configuration problem: SMTP authentication failed (535 ...); emails wait and retry",
        "SMTP configuration problem: SMTP authentication failed (535 ...); emails wait and "
        "retry (3 more failures like it since the last line)",
        "SMTP configuration problem: TLS certificate verification failed; emails wait and retry",
    ]


async def test_many_failures_make_one_warning_a_minute_and_a_success_clears_health(
    auth_smtp: Smtp,
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler, port = auth_smtp
    settings = make_settings(smtp_port=port, smtp_username="jobs", smtp_password="wrong")
    pool = SmtpPool(settings, SmtpProblems(redis))
    message = build_message(SPEC, settings.mail_from, "<config@example.com>")
    try:
        with caplog.at_level(logging.INFO):
            for _ in range(20):
                with pytest.raises(SmtpConfigError, match="535"):
                    await pool.send(message, ["a@example.com"])
        record = await redis.hgetall(SMTP_PROBLEM_KEY)  # type: ignore[misc]
        assert record[b"reason"].startswith(b"SMTP authentication failed (535")
        [line] = loud_lines(caplog, "SMTP authentication failed")
        assert line.levelno == logging.WARNING
        assert handler.auth_attempts >= 20  # every send tried, one line said it

        handler.password = "wrong"
        await pool.send(message, ["a@example.com"])
        assert not await redis.exists(SMTP_PROBLEM_KEY)
    finally:
        await pool.close()
    assert handler.message_ids() == ["<config@example.com>"]
