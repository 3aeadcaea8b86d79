"""Everyday email features end to end (API -> Redis -> worker -> aiosmtpd on loopback):
display names, attachments, internationalized domains without SMTPUTF8, header lines folded
within 998 bytes. What the SMTP peer received is parsed back with the email package."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from email import message_from_string, policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP
from arq.connections import ArqRedis
from arq.jobs import Job

from app.mailsink import MAX_MESSAGE_BYTES, server_port
from app.web import create_app
from asyncjobs.settings import Settings
from tests.conftest import api_and_worker
from tests.helpers import ApiClient, api_client, wait_for
from tests.jobwait import wait_job
from tests.servers import INVOICE_PDF, ReceivedMail, RecordingSmtpHandler, SiteStats

Smtp = tuple[RecordingSmtpHandler, int]
TEXT = {"subject": "Hello", "text": "Hi!"}
IDN = "user@bücher.example"
IDN_ASCII = "user@xn--bcher-kva.example"


@pytest.fixture(autouse=True)
def _empty_database(redis: ArqRedis) -> None:
    """The `redis` fixture flushes the database: the workers these tests start must not find
    jobs an earlier test left queued (and send them to this test's SMTP server)."""


@contextlib.asynccontextmanager
async def smtp_server(smtputf8: bool, pipelining: bool = True) -> AsyncIterator[Smtp]:
    """A recording aiosmtpd server of the test's own, offering SMTPUTF8 or not (the `smtp`
    fixture's does not: aiosmtpd's default)."""
    handler = RecordingSmtpHandler(pipelining=pipelining)

    def protocol() -> SMTP:
        return SMTP(
            handler, hostname="t", enable_SMTPUTF8=smtputf8, data_size_limit=MAX_MESSAGE_BYTES
        )

    server = await asyncio.get_running_loop().create_server(protocol, host="127.0.0.1", port=0)
    try:
        yield handler, server_port(server)
    finally:
        server.close()
        await server.wait_closed()


async def send(api: ApiClient, body: dict[str, Any]) -> dict[str, Any]:
    """POST /jobs/email (202 expected) and wait for the job to end; its status."""
    response = await api.post("/jobs/email", json=body)
    assert response.status == 202, await response.text()
    return await wait_job(api, (await response.json())["job_id"])


async def one_message(handler: RecordingSmtpHandler) -> ReceivedMail:
    async def arrived() -> ReceivedMail | None:
        return handler.messages[0] if handler.messages else None

    return await wait_for(arrived, what="the message at the SMTP server")


async def refused_422(api: ApiClient, body: dict[str, Any]) -> dict[str, str]:
    """The 422's details, field -> message."""
    response = await api.post("/jobs/email", json=body)
    assert response.status == 422, await response.text()
    return {d["field"]: d["message"] for d in (await response.json())["details"]}


def lines_within_998(raw: bytes) -> None:
    assert raw, "the raw message was recorded"
    longest = max(len(line) for line in raw.split(b"\r\n"))
    assert longest <= 998, f"a line of {longest} bytes"


def names(message: EmailMessage, header: str) -> list[tuple[str, str]]:
    return [(a.display_name, a.addr_spec) for a in message[header].addresses]


# --- display names ----------------------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
async def test_display_names_go_to_headers_and_bare_addresses_to_the_envelope(
    make_settings: Callable[..., Settings], pipelining: bool
) -> None:
    body = TEXT | {
        "to": [
            "Ada Lovelace <ada@example.com>",
            {"name": "Lovelace, Ada", "email": "al@example.com"},
        ],
        "cc": ['"Zoë Müller" <zoe@example.com>', "ada@EXAMPLE.com"],  # the same as Ada: once
        "bcc": {"name": "Hidden Person", "email": "hidden@example.com"},
        "from": 'Shop "Best" <shop@example.com>',
        "reply_to": {"name": "Help <desk>", "email": "help@example.com"},
    }  # fmt: skip
    async with smtp_server(smtputf8=False, pipelining=pipelining) as (handler, port):
        async with api_and_worker(make_settings(smtp_port=port)) as api:
            status = await send(api, body)
        received = await one_message(handler)
    assert status["status"] == "complete", status
    assert received.mail_from == "shop@example.com"  # MAIL FROM: the bare address
    assert sorted(received.rcpt_tos) == sorted(
        ["ada@example.com", "al@example.com", "zoe@example.com", "hidden@example.com"]
    )
    message = received.message
    assert names(message, "To") == [
        ("Ada Lovelace", "ada@example.com"), ("Lovelace, Ada", "al@example.com")
    ]  # fmt: skip
    assert names(message, "Cc") == [("Zoë Müller", "zoe@example.com")]
    assert names(message, "From") == [('Shop "Best"', "shop@example.com")]
    assert names(message, "Reply-To") == [("Help <desk>", "help@example.com")]
    assert b"Hidden" not in received.raw and b"hidden@" not in received.raw  # Bcc: no header
    assert received.raw.isascii()  # the non-ASCII name as RFC 2047 encoded words
    lines_within_998(received.raw)


async def test_plain_addresses_are_stored_as_before_and_names_as_name_and_email(
    api: ApiClient, redis: ArqRedis
) -> None:
    response = await api.post(
        "/jobs/email", json=TEXT | {"to": ["a@example.com", "Bee <b@example.com>"]}
    )
    assert response.status == 202
    info = await Job((await response.json())["job_id"], redis).info()  # no worker: queued
    assert info is not None
    stored = info.kwargs["email"]
    json.dumps(stored)  # JSON all the way
    assert stored["to"] == ["a@example.com", {"name": "Bee", "email": "b@example.com"}]
    assert stored["from"] is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("to", "Ada\r\nBcc: victim@example.com <ada@example.com>"),
        ("to", "Ada\n <ada@example.com>"),
        ("to", {"name": "Ada\r\nBcc: victim@example.com", "email": "ada@example.com"}),
        ("cc", {"name": "x" * 257, "email": "ada@example.com"}),
        ("from", {"name": "Shop\u2028X-Evil: 1", "email": "shop@example.com"}),
        ("reply_to", {"name": "Help", "email": "help@example.com", "extra": 1}),
        ("to", {"name": "Ada"}),
        ("to", "Ada Lovelace <not an address>"),
    ],
)
async def test_bad_display_names_and_mailboxes_are_422(
    api: ApiClient, field: str, value: object
) -> None:
    details = await refused_422(api, {"to": "a@example.com"} | TEXT | {field: value})
    assert any(f.split(".")[0] == field for f in details), details


async def test_the_sender_domain_rule_and_counting_use_the_address(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(mail_allowed_sender_domains=["shop.example"], mail_max_recipients=2)
    async with api_client(create_app(settings)) as api:
        spoof = {"name": "shop.example", "email": "ceo@bank.example"}
        details = await refused_422(api, {"to": "a@example.com"} | TEXT | {"from": spoof})
        assert "not allowed" in str(details)
        three = ["A <a@example.com>", "B <b@example.com>", "C <c@example.com>"]
        assert "more than the limit" in str(await refused_422(api, TEXT | {"to": three}))
        same = ["A <a@example.com>", "Other name <a@EXAMPLE.com>", "b@example.com"]
        response = await api.post("/jobs/email", json=TEXT | {"to": same})
        assert response.status == 202, await response.text()  # 2 after de-duplication


async def test_newsletter_recipients_and_sender_take_display_names(
    api: ApiClient, worker: object, smtp: Smtp
) -> None:
    body = {
        "recipients": [
            "Ada Lovelace <ada@example.com>",
            {"email": "bob@example.com", "name": "Bob Müller", "vars": {"code": "B1"}},
            "plain@example.com",
            "Ada again <ada@EXAMPLE.com>",  # the same address: once, its first entry
        ],
        "subject": "{{ code | default('-') }} for {{ name | default('friend') }}",
        "text": "Dear {{ name | default(email) }}",
        "from": {"name": "The News", "email": "news@example.com"},
        "reply_to": "Desk <desk@example.com>",
    }
    response = await api.post("/jobs/newsletter", json=body)
    assert response.status == 202, await response.text()
    assert (await response.json())["recipients"] == 3
    handler = smtp[0]

    async def all_three() -> list[ReceivedMail] | None:
        return handler.messages if len(handler.messages) == 3 else None

    received = await wait_for(all_three, what="3 newsletter messages")
    by_rcpt = {m.rcpt_tos[0]: m for m in received}
    assert set(by_rcpt) == {"ada@example.com", "bob@example.com", "plain@example.com"}
    ada, bob, plain = (by_rcpt[a].message for a in sorted(by_rcpt))
    assert names(ada, "To") == [("Ada Lovelace", "ada@example.com")]
    assert ada["Subject"] == "- for Ada Lovelace"
    assert names(bob, "To") == [("Bob Müller", "bob@example.com")]
    assert bob["Subject"] == "B1 for Bob Müller"
    assert names(plain, "To") == [("", "plain@example.com")]
    assert plain["Subject"] == "- for friend"
    for mail in received:
        assert mail.mail_from == "news@example.com"
        assert names(mail.message, "From") == [("The News", "news@example.com")]
        assert names(mail.message, "Reply-To") == [("Desk", "desk@example.com")]


# --- attachments ------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def test_inline_attachments_arrive_with_their_bytes_names_and_types(
    api: ApiClient, worker: object, smtp: Smtp
) -> None:
    csv = "name,total\r\nÅsa,12\r\n".encode()
    long_name = "Rechnung für März " * 12 + ".pdf"  # 220 characters, not ASCII: RFC 2231
    body = TEXT | {
        "to": "a@example.com",
        "html": "<p>Hi!</p>",
        "attachments": [
            {"filename": "invoice.pdf", "content_base64": b64(INVOICE_PDF)},  # type guessed
            {"filename": "données.csv", "content_type": "Text/CSV", "content_base64": b64(csv)},
            {"filename": long_name, "content_base64": b64(b"%PDF-1.7")},
            {"filename": 'odd "name"', "content_base64": b64(b"\x00\x01")},  # no extension
            {"filename": "report.csv.gz", "content_base64": b64(b"\x1f\x8b")},
        ],
    }
    status = await send(api, body)
    assert status["status"] == "complete", status
    received = (await one_message(smtp[0])).message
    assert received.get_content_type() == "multipart/mixed"
    text, html = received.get_body(("plain",)), received.get_body(("html",))
    assert text is not None and text.get_content().strip() == "Hi!"
    assert html is not None and html.get_content().strip() == "<p>Hi!</p>"
    got = [
        (part.get_filename(), part.get_content_type(), part.get_payload(decode=True))
        for part in received.iter_attachments()
    ]
    assert got == [
        ("invoice.pdf", "application/pdf", INVOICE_PDF),
        ("données.csv", "text/csv", csv),
        (long_name, "application/pdf", b"%PDF-1.7"),
        ('odd "name"', "application/octet-stream", b"\x00\x01"),
        ("report.csv.gz", "application/gzip", b"\x1f\x8b"),
    ]
    raw = smtp[0].messages[0].raw
    assert b"filename*0*=utf-8''Rechnung%20f%C3%BCr" in raw  # RFC 2231, in continuations
    lines_within_998(raw)


async def test_a_url_attachment_is_fetched_by_the_worker(
    api: ApiClient, worker: object, smtp: Smtp, site: tuple[str, SiteStats]
) -> None:
    base, stats = site
    body = TEXT | {
        "to": "Ada <ada@example.com>",
        "attachments": [{"filename": "Invoice 42.pdf", "url": f"{base}/files/invoice.pdf"}],
    }
    status = await send(api, body)
    assert status["status"] == "complete", status
    [attachment] = (await one_message(smtp[0])).message.iter_attachments()
    assert attachment.get_filename() == "Invoice 42.pdf"
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_payload(decode=True) == INVOICE_PDF
    assert stats.hits["/files/invoice.pdf"] == 1


async def test_a_url_that_fails_for_a_while_retries_the_job(
    api: ApiClient, worker: object, smtp: Smtp, site: tuple[str, SiteStats]
) -> None:
    url = f"{site[0]}/flaky?key=attachment&fail=2&status=503"
    attachment = {"filename": "page.html", "url": url}
    status = await send(api, TEXT | {"to": "a@example.com", "attachments": [attachment]})
    assert status["status"] == "complete", status
    assert status["tries"] == 3  # two 503s, then the file
    [part] = (await one_message(smtp[0])).message.iter_attachments()
    assert part.get_content_type() == "text/html"
    assert b"Test page flaky" in part.get_payload(decode=True)


@pytest.mark.parametrize(
    ("host", "path", "settings_override", "reason"),
    [
        ("127.0.0.1", "/missing", {}, "HTTP 404"),
        ("127.0.0.1", "/files/invoice.pdf", {"mail_max_attachment_bytes": 100},
         "larger than the 100 byte"),
        ("127.0.0.1", "/files/invoice.pdf", {"mail_max_total_attachment_bytes": 50},
         "larger than the 50 byte"),
        # a name the API cannot judge without DNS: the worker's guarded resolver refuses it
        ("localhost", "/files/invoice.pdf", {"scrape_allowed_cidrs": []}, "non-public address"),
    ],
)  # fmt: skip
async def test_a_url_refused_for_good_fails_the_job_with_the_reason(
    make_settings: Callable[..., Settings],
    smtp: Smtp,
    site: tuple[str, SiteStats],
    host: str,
    path: str,
    settings_override: dict[str, Any],
    reason: str,
) -> None:
    url = site[0].replace("127.0.0.1", host) + path
    attachment = {"filename": "a.pdf", "url": url}
    async with api_and_worker(make_settings(**settings_override)) as api:
        status = await send(api, TEXT | {"to": "a@example.com", "attachments": [attachment]})
    assert status["status"] == "failed", status
    assert status["tries"] == 1
    assert "PermanentJobError" in status["error"] and reason in status["error"], status["error"]
    assert "attachment 'a.pdf'" in status["error"]
    assert smtp[0].messages == []


async def test_an_export_is_attached_by_its_download_url(
    api: ApiClient, worker: object, smtp: Smtp, settings: Settings
) -> None:
    export = await api.post("/jobs/export", json={"format": "csv", "delay_seconds": 1})
    assert export.status == 202
    download_url = (await export.json())["download_url"]
    name = download_url.rsplit("/", 1)[1]
    attachment = {"filename": "documents.csv", "url": download_url}
    # the export is written a second from now: the email tries again until it is there
    status = await send(api, TEXT | {"to": "a@example.com", "attachments": [attachment]})
    assert status["status"] == "complete", status
    assert status["tries"] >= 2, status
    [part] = (await one_message(smtp[0])).message.iter_attachments()
    assert part.get_content_type() == "text/csv"
    assert part.get_payload(decode=True) == Path(settings.exports_dir, name).read_bytes()

    gone = {"filename": "old.csv", "url": f"/exports/{'0' * 32}.csv"}
    status = await send(api, TEXT | {"to": "a@example.com", "attachments": [gone]})
    assert (
        status["status"] == "failed" and "expired, failed or never requested" in status["error"]
    ), status


async def test_attachment_422s(make_settings: Callable[..., Settings]) -> None:
    """Checked before anything is enqueued: the caps, names, types, sources and the guard."""
    settings = make_settings(
        scrape_allowed_cidrs=[],
        mail_max_attachment_bytes=1000,
        mail_max_total_attachment_bytes=1500,
    )
    one = {"to": "a@example.com"} | TEXT
    cases: list[tuple[list[dict[str, str]], str, str]] = [
        ([{"filename": "big.bin", "content_base64": b64(b"x" * 1001)}],
         "attachments.0.content_base64", "MAIL_MAX_ATTACHMENT_BYTES"),
        ([{"filename": f"{n}.bin", "content_base64": b64(b"x" * 800)} for n in range(2)],
         "attachments", "MAIL_MAX_TOTAL_ATTACHMENT_BYTES"),
        ([{"filename": "../etc/passwd", "content_base64": b64(b"x")}],
         "attachments.0.filename", "without '/'"),
        ([{"filename": "C:\\boot.ini", "content_base64": b64(b"x")}],
         "attachments.0.filename", "without '/'"),
        ([{"filename": "a.pdf\r\nX-Evil: 1", "content_base64": b64(b"x")}],
         "attachments.0.filename", "CR, LF"),
        ([{"filename": "a.pdf", "content_type": "pdf", "content_base64": b64(b"x")}],
         "attachments.0.content_type", "type/subtype"),
        ([{"filename": "a.eml", "content_type": "message/rfc822", "content_base64": b64(b"x")}],
         "attachments.0.content_type", "single-part"),
        ([{"filename": "a.pdf", "content_base64": "not base64!"}],
         "attachments.0.content_base64", "base64"),
        ([{"filename": "a.pdf"}], "attachments.0", "exactly one"),
        ([{"filename": "a.pdf", "url": "http://127.0.0.1:8080/x.pdf"}],
         "attachments.0.url", "not a public address"),
        ([{"filename": "a.pdf", "url": "file:///etc/passwd"}], "attachments.0.url", "http(s)"),
        ([{"filename": "a.pdf", "url": "/etc/passwd"}], "attachments.0.url", "/exports/"),
    ]  # fmt: skip
    async with api_client(create_app(settings)) as api:
        for attachments, field, words in cases:
            details = await refused_422(api, one | {"attachments": attachments})
            assert words in details.get(field, ""), (field, details)


async def test_inline_attachments_are_bounded_by_the_request_body_cap(api: ApiClient) -> None:
    """MAX_BODY_BYTES (1 MiB by default) holds about 750 KiB of file in base64."""
    fits = {"filename": "a.bin", "content_base64": b64(b"x" * 700 * 1024)}
    over = {"filename": "a.bin", "content_base64": b64(b"x" * 800 * 1024)}
    one = {"to": "a@example.com"} | TEXT
    assert (await api.post("/jobs/email", json=one | {"attachments": [fits]})).status == 202
    assert (await api.post("/jobs/email", json=one | {"attachments": [over]})).status == 413


# --- internationalized domains ----------------------------------------------------------------


async def test_an_idn_domain_goes_as_punycode_when_the_server_lacks_smtputf8(
    api: ApiClient, worker: object, smtp: Smtp
) -> None:
    """The `smtp` fixture's server does not offer SMTPUTF8. The recipient whose local part is
    not ASCII is refused for good, with the reason; the others get the message."""
    body = TEXT | {
        "to": [{"name": "Bücher Fan", "email": IDN}, "zoë@example.com"],
        "cc": "plain@example.com",
        "from": "Shop <shop@example.com>",
    }
    status = await send(api, body)
    assert status["status"] == "complete", status
    received = await one_message(smtp[0])
    assert sorted(received.rcpt_tos) == sorted([IDN_ASCII, "plain@example.com"])
    assert received.raw.isascii()
    assert names(received.message, "To")[0] == ("Bücher Fan", IDN_ASCII)
    result = status["result"]
    assert result["outcome"] == "partial"
    assert "5.6.7" in result["refused"]["zoë@example.com"]
    assert "SMTPUTF8" in result["refused"]["zoë@example.com"]
    assert set(result["accepted"]) == {IDN, "plain@example.com"}


async def test_without_smtputf8_a_non_ascii_local_part_alone_fails_for_good(
    api: ApiClient, worker: object, smtp: Smtp
) -> None:
    recipient = await send(api, TEXT | {"to": "zoë@example.com"})
    assert recipient["status"] == "failed" and recipient["tries"] == 1, recipient
    assert "5.6.7" in recipient["error"] and "SMTPUTF8" in recipient["error"]
    sender = await send(api, TEXT | {"to": "a@example.com", "from": "zoë@example.com"})
    assert sender["status"] == "failed" and sender["tries"] == 1, sender
    assert "PermanentJobError" in sender["error"] and "SMTPUTF8" in sender["error"]
    assert smtp[0].messages == []


async def test_with_smtputf8_addresses_go_as_they_are(
    make_settings: Callable[..., Settings],
) -> None:
    async with smtp_server(smtputf8=True) as (handler, port):
        async with api_and_worker(make_settings(smtp_port=port)) as api:
            to = [{"name": "Zoë " * 60, "email": "zoë@example.com"}, IDN]
            status = await send(api, {"to": to, "subject": "é" * 998, "text": "t"})
        received = await one_message(handler)
    assert status["status"] == "complete", status
    assert sorted(received.rcpt_tos) == [IDN, "zoë@example.com"]
    # UTF-8 headers (RFC 6532), read as text: the bytes parser takes them for 8-bit garbage
    message = message_from_string(received.raw.decode("utf-8"), policy=policy.default)
    assert isinstance(message, EmailMessage)
    assert names(message, "To") == [(("Zoë " * 60).strip(), "zoë@example.com"), ("", IDN)]
    assert message["Subject"] == "é" * 998
    lines_within_998(received.raw)


# --- header lines within 998 bytes -------------------------------------------------------------


async def test_long_headers_fold_within_998_bytes_and_read_back_whole(
    api: ApiClient, worker: object, smtp: Smtp
) -> None:
    subject = "x" * 998  # one word: it can only be cut as encoded words
    long_names = [
        "y" * 256,  # one word
        "Zoë Müller-Lüdenscheidt " * 10,  # not ASCII: encoded words
        '"quoted, with commas" ' * 11,
    ]
    to = [{"name": long_names[n % 3][:256], "email": f"r{n}@example.com"} for n in range(30)]
    cc = [f"c{n}@example.com" for n in range(20)]
    body = {"to": to, "cc": cc, "subject": subject, "text": "t",
            "headers": {"X-Long": "z" * 998, "X-Words": ("word " * 190).strip()}}  # fmt: skip
    status = await send(api, body)
    assert status["status"] == "complete", status
    received = await one_message(smtp[0])
    lines_within_998(received.raw)
    message = received.message
    assert message["Subject"] == subject
    assert message["X-Long"] == "z" * 998
    assert message["X-Words"] == ("word " * 190).strip()  # folded between the words
    assert len(message.get_all("To") or []) == 1  # one logical header, folded
    assert [a.addr_spec for a in message["To"].addresses] == [t["email"] for t in to]
    assert [a.addr_spec for a in message["Cc"].addresses] == cc
    # RFC 2047: the space between two encoded words is not part of the name (Python's
    # address parser keeps it; the older decoder follows the RFC)
    header = _raw_header(received.raw, "To")
    decoded = str(make_header(decode_header(header)))
    for item in to:
        assert f"{item['name'].strip()}" in decoded.replace('\\"', '"'), item["name"]


def _raw_header(raw: bytes, name: str) -> str:
    """A header's value as sent, unfolded."""
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    unfolded = head.replace("\r\n ", " ").replace("\r\n\t", "\t")
    for line in unfolded.split("\r\n"):
        if line.lower().startswith(name.lower() + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} header")
