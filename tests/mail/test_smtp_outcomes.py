"""Per-recipient delivery outcomes and pooled connections the server closed, against a real
SMTP server on loopback (aiosmtpd, tests/servers.py): every test counts what the server saw.

- a recipient answered 4xx at RCPT TO gets the message on a retry, and only it (same
  Message-ID); one answered 5xx is never tried again by the job and is dead-lettered, while
  the job completes for the others (`partial`); each recipient's answer is in the result;
- a newsletter counts such a message sent once its last recipient is settled;
- a server that closes a pooled connection (421 after N messages, an idle connection dropped)
  costs no try and no wait: the message goes at once on a new connection.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

from arq.connections import ArqRedis
from arq.worker import Worker

from asyncjobs.errors import TransientJobError
from asyncjobs.keys import SENT_KEY_PREFIX
from asyncjobs.settings import Settings
from jobs.mail.email import EmailSpec, build_message
from jobs.mail.newsletter import batch_progress, start_progress
from jobs.mail.smtp import SmtpPool
from jobs.values import as_utc
from tests.conftest import api_and_worker
from tests.helpers import ApiClient, wait_for
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler

Smtp = tuple[RecordingSmtpHandler, int]


async def post_email(api: ApiClient, to: list[str]) -> tuple[str, str]:
    """POST /jobs/email: (job id, Message-ID)."""
    response = await api.post("/jobs/email", json={"to": to, "subject": "s", "text": "t"})
    assert response.status == 202, await response.text()
    body = await response.json()
    return body["job_id"], body["message_id"]


def retrying(
    api: ApiClient, job_id: str, tries: int
) -> Callable[[], Coroutine[Any, Any, dict[str, Any] | None]]:
    """A condition: the job has started `tries` tries and says why the last one failed."""

    async def check() -> dict[str, Any] | None:
        view: dict[str, Any] = await (await api.get(f"/jobs/{job_id}")).json()
        assert view["status"] not in ("complete", "failed"), view
        return view if view["error"] and (view["tries"] or 0) >= tries else None

    return check


def delivered(handler: RecordingSmtpHandler) -> list[tuple[list[str], str]]:
    """What the server took: (envelope recipients, Message-ID) per message."""
    return [(m.rcpt_tos, str(m.message["Message-ID"])) for m in handler.messages]


async def test_a_deferred_recipient_gets_the_message_on_a_retry_and_only_it(
    api: ApiClient, worker: Worker, smtp: Smtp, redis: ArqRedis
) -> None:
    handler, _ = smtp
    handler.defer_rcpt = {"later@example.com"}
    job_id, message_id = await post_email(api, ["now@example.com", "later@example.com"])

    waiting = await wait_for(retrying(api, job_id, tries=3), what="three tries")
    assert "later@example.com: 451" in waiting["error"], waiting
    assert "accepted: now@example.com" in waiting["error"], waiting
    assert delivered(handler) == [(["now@example.com"], message_id)]  # at once, for now@
    assert await redis.get(SENT_KEY_PREFIX + message_id) == b"partial"  # not everyone has it

    handler.defer_rcpt.clear()  # the mailbox takes mail again
    done = await wait_job(api, job_id)
    assert done["status"] == "complete", done
    result = done["result"]
    assert result["outcome"] == "sent"
    accepted = {"status": "accepted", "code": 250, "message": "OK"}
    assert result["recipients"] == {"now@example.com": accepted, "later@example.com": accepted}
    # later@ got exactly one copy, with the same Message-ID; now@ was never asked again
    assert delivered(handler) == [
        (["now@example.com"], message_id),
        (["later@example.com"], message_id),
    ]
    assert handler.rcpt_attempts["now@example.com"] == 1
    assert handler.rcpt_attempts["later@example.com"] == done["tries"] >= 3  # once a try
    assert await redis.get(SENT_KEY_PREFIX + message_id) == b"1"  # everyone has it now

    # a re-run of the message (what a crash leads to) sends nothing, to nobody
    again = await redis.enqueue_job(
        "send_email",
        email={"to": ["now@example.com", "later@example.com"], "subject": "s", "text": "t"},
        message_id=message_id,
    )
    assert again is not None
    assert (await wait_job(api, again.job_id))["result"]["skipped"] == "already sent"
    assert len(handler.messages) == 2


async def test_a_refused_recipient_is_not_retried_and_is_dead_lettered_alone(
    api: ApiClient, worker: Worker, smtp: Smtp
) -> None:
    """One 451 and one 550, nothing accepted: only the 451 one is tried again."""
    handler, _ = smtp
    handler.defer_rcpt, handler.refuse_rcpt = {"later@example.com"}, {"gone@example.com"}
    job_id, message_id = await post_email(api, ["later@example.com", "gone@example.com"])

    waiting = await wait_for(retrying(api, job_id, tries=4), what="four tries")
    assert "1 of 2 recipient(s) deferred" in waiting["error"], waiting
    assert "refused for good: gone@example.com: 550" in waiting["error"], waiting
    assert handler.messages == []
    assert handler.rcpt_attempts["gone@example.com"] == 1  # not once per try

    handler.defer_rcpt.clear()
    done = await wait_job(api, job_id)
    assert done["status"] == "complete", done  # partial success: a state, not a failure
    result = done["result"]
    assert result["outcome"] == "partial"
    assert result["recipients"]["later@example.com"]["status"] == "accepted"
    assert result["recipients"]["gone@example.com"] == {
        "status": "refused",
        "code": 550,
        "message": "5.1.1 Mailbox unavailable",
    }
    assert "gone@example.com: 550" in done["warning"]
    assert delivered(handler) == [(["later@example.com"], message_id)]
    assert handler.rcpt_attempts["gone@example.com"] == 1

    entry = await (await api.get(f"/dead-letter/{job_id}")).json()
    assert entry["reason"] == "permanent" and "gone@example.com: 550" in entry["error"]
    assert entry["arguments"]["recipients"] == ["gone@example.com"]

    # the mailbox exists again: the dead letter's retry sends to gone@ alone, same Message-ID
    handler.refuse_rcpt.clear()
    retried = await api.post(f"/dead-letter/{job_id}/retry")
    assert retried.status == 202
    again = await wait_job(api, (await retried.json())["job_id"])
    assert again["status"] == "complete" and again["tries"] == 1, again
    assert again["result"]["outcome"] == "sent"
    assert delivered(handler) == [
        (["later@example.com"], message_id),
        (["gone@example.com"], message_id),
    ]
    assert handler.rcpt_attempts == {"later@example.com": done["tries"], "gone@example.com": 2}


async def test_a_recipient_refused_beside_an_accepted_one_completes_the_job_at_once(
    api: ApiClient, worker: Worker, smtp: Smtp, redis: ArqRedis
) -> None:
    handler, _ = smtp
    handler.refuse_rcpt = {"gone@example.com"}
    job_id, message_id = await post_email(api, ["a@example.com", "gone@example.com"])
    done = await wait_job(api, job_id)
    assert done["status"] == "complete" and done["tries"] == 1, done
    assert done["result"]["outcome"] == "partial"
    assert done["result"]["accepted"] == ["a@example.com"]
    assert list(done["result"]["refused"]) == ["gone@example.com"]
    assert delivered(handler) == [(["a@example.com"], message_id)]
    entry = await (await api.get(f"/dead-letter/{job_id}")).json()
    assert entry["arguments"]["recipients"] == ["gone@example.com"]

    # another job of the same message (a plain producer enqueueing it again): a@ has it and is
    # not asked again; gone@ is, being another job's refusal, and refuses again
    rerun = await redis.enqueue_job(
        "send_email",
        email={"to": ["a@example.com", "gone@example.com"], "subject": "s", "text": "t"},
        message_id=message_id,
    )
    assert rerun is not None
    view = await wait_job(api, rerun.job_id)
    assert view["status"] == "complete" and view["result"]["outcome"] == "partial", view
    assert handler.rcpt_attempts == {"a@example.com": 1, "gone@example.com": 2}
    assert len(handler.messages) == 1


async def test_a_batch_counts_a_message_sent_when_its_last_recipient_is_settled(
    redis: ArqRedis, worker: Worker, api: ApiClient, smtp: Smtp, settings: Settings
) -> None:
    handler, _ = smtp
    handler.defer_rcpt, handler.refuse_rcpt = {"later@example.com"}, {"gone@example.com"}
    await start_progress(redis, "nl-1", 2, settings.sent_marker_ttl)
    mixed = await redis.enqueue_job(
        "send_email",
        email={"to": ["now@example.com", "later@example.com"], "subject": "s", "text": "t"},
        message_id="<nl-1.0@example.com>",
        batch_id="nl-1",
    )
    refused = await redis.enqueue_job(
        "send_email",
        email={"to": ["gone@example.com"], "subject": "s", "text": "t"},
        message_id="<nl-1.1@example.com>",
        batch_id="nl-1",
    )
    assert mixed is not None and refused is not None
    assert (await wait_job(api, refused.job_id))["status"] == "failed"
    await wait_for(retrying(api, mixed.job_id, tries=3), what="three tries")
    progress = await batch_progress(redis, "nl-1")
    assert progress is not None
    # now@ has it, later@ waits: the message is neither sent nor failed yet
    assert (progress.sent, progress.failed, progress.pending) == (0, 1, 1)

    handler.defer_rcpt.clear()
    assert (await wait_job(api, mixed.job_id))["status"] == "complete"
    progress = await batch_progress(redis, "nl-1")
    assert progress is not None
    assert (progress.sent, progress.failed, progress.pending) == (1, 1, 0)
    assert [rcpts for rcpts, _ in delivered(handler)] == [
        ["now@example.com"],
        ["later@example.com"],
    ]


async def send_in_turn(api: ApiClient, count: int) -> list[dict[str, Any]]:
    """`count` emails, each enqueued once the one before is done (so each reuses the pooled
    connection); their final views."""
    views = []
    for i in range(count):
        job_id, _ = await post_email(api, [f"r{i}@example.com"])
        views.append(await wait_job(api, job_id))
    return views


def seconds_running(view: dict[str, Any]) -> float:
    """From the job's start to its end, as GET /jobs/{id} reports them."""
    start, finish = (as_utc(datetime.fromisoformat(view[k])) for k in ("start_time", "finish_time"))
    return (finish - start).total_seconds()


async def test_a_421_after_n_messages_is_sent_again_at_once_without_a_try(
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    smtp: Smtp,
    fault_report: Callable[[str], None],
) -> None:
    handler, _ = smtp
    handler.close_after = 3  # then "421 too many messages" to the next MAIL, and it hangs up
    settings = make_settings(smtp_max_connections=1)
    async with api_and_worker(settings) as api:
        views = await send_in_turn(api, 4)
    assert [v["status"] for v in views] == ["complete"] * 4
    assert [v["tries"] for v in views] == [1, 1, 1, 1]  # no try spent on the 421
    assert handler.closed == 1
    assert len(handler.messages) == 4
    assert handler.messages_per_connection() == [3, 1]
    took = seconds_running(views[3])
    assert took < 1.0, took  # a retry would have waited at least EMAIL_RETRY_BASE_DELAY / 2
    fault_report(f"421 after 3 messages: the 4th sent on a new connection in {took * 1000:.0f} ms")


async def test_an_idle_connection_the_server_dropped_costs_no_try(
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    smtp: Smtp,
    fault_report: Callable[[str], None],
) -> None:
    handler, _ = smtp
    settings = make_settings(smtp_max_connections=1)
    async with api_and_worker(settings) as api:
        [first] = await send_in_turn(api, 1)
        handler.hang_up_on_mail = 1  # the pooled connection is gone, found at the next MAIL
        [second] = await send_in_turn(api, 1)
    assert (first["tries"], second["tries"]) == (1, 1)
    assert handler.closed == 1
    assert handler.messages_per_connection() == [1, 1]
    took = seconds_running(second)
    assert took < 1.0, took
    fault_report(f"dropped pooled connection: the next email sent in {took * 1000:.0f} ms")


async def test_a_new_connection_closed_by_the_server_is_not_sent_again_at_once(
    smtp: Smtp, settings: Settings
) -> None:
    """Only a reused connection earns the immediate resend: a server that says 421 to a new
    connection is busy, and the job's retry (with its backoff) is the answer."""
    handler, _ = smtp
    handler.close_after = 0
    pool = SmtpPool(settings)
    spec = EmailSpec.model_validate({"to": "a@example.com", "subject": "s", "text": "t"})
    started = time.monotonic()
    try:
        message = build_message(spec, settings.mail_from, "<fresh@example.com>")
        try:
            await pool.send(message, ["a@example.com"])
        except TransientJobError as exc:
            assert "421" in str(exc) or "closed" in str(exc)
        else:
            raise AssertionError("the 421 was not an error")
    finally:
        await pool.close()
    assert handler.closed == 1  # one MAIL, no resend
    assert handler.messages == []
    assert time.monotonic() - started < 5
