"""Email jobs: the validated message spec, MIME building and the arq job that sends it."""

from __future__ import annotations

import base64
import functools
import logging
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from email.headerregistry import Address as HeaderAddress
from email.message import EmailMessage, Message
from email.mime.multipart import MIMEMultipart
from email.utils import format_datetime
from typing import Annotated, Any, cast
from uuid import uuid4

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from redis.asyncio import Redis

from asyncjobs.addresses import Mailbox, domain_of, unique_addresses
from asyncjobs.errors import PermanentJobError
from asyncjobs.keys import (
    BATCH_ABORTED_FIELD,
    MAIL_BATCH_KEY_PREFIX,
    SENT_KEY_PREFIX,
)
from asyncjobs.redis import NotReplicatedError, execute_replicated, replicas_ready
from asyncjobs.settings import Settings
from jobs.context import WorkerContext
from jobs.mail.attachments import (
    MAX_ATTACHMENTS,
    Attachment,
    add_to,
    check_total,
    load_attachments,
    mime_part,
    with_parent_export,
)
from jobs.mail.headers import address_list, header_name, header_value, single_line
from jobs.mail.outcomes import (
    Delivery,
    count_failed,
    count_in_batch,
    dead_letter_refused,
    job_id_of,
    job_recipients,
    recorded_answers,
    refused_for_good,
    send_part,
)
from jobs.retry import builtin, report

log = logging.getLogger(__name__)

# A hard ceiling; settings (passed as validation context) may lower it.
MAX_RECIPIENTS = 1000
MAX_BODY_CHARS = 512 * 1024

SingleLine = Annotated[str, AfterValidator(single_line)]
# Each address `ada@example.com`, `Ada Lovelace <ada@example.com>` or {name, email}
Recipients = Annotated[list[Mailbox], Field(min_length=1, max_length=MAX_RECIPIENTS)]


class EmailSpec(BaseModel):
    """What a caller may ask for: the body of `POST /jobs/email` and the job's argument."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, str_strip_whitespace=False)

    to: Recipients
    cc: list[Mailbox] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    bcc: list[Mailbox] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    subject: SingleLine = Field(min_length=1, max_length=998)
    text: str | None = Field(None, max_length=MAX_BODY_CHARS)
    html: str | None = Field(None, max_length=MAX_BODY_CHARS)
    from_: Mailbox | None = Field(None, alias="from")
    reply_to: Mailbox | None = None
    headers: dict[str, SingleLine] = Field(default_factory=dict, max_length=20)
    attachments: list[Attachment] = Field(default_factory=list, max_length=MAX_ATTACHMENTS)

    @field_validator("to", "cc", "bcc", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str | dict) else value

    @field_validator("attachments")
    @classmethod
    def _within_the_total(
        cls, attachments: list[Attachment], info: ValidationInfo
    ) -> list[Attachment]:
        check_total(attachments, info)
        return attachments

    @field_validator("headers")
    @classmethod
    def _header_names(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            header_name(name)
            if len(value) > 998:
                raise ValueError(f"header {name!r} is longer than 998 characters")
        return headers

    @model_validator(mode="after")
    def _check_body_and_limits(self, info: ValidationInfo) -> EmailSpec:
        # each address once, in the first field it appears in: to, then cc, then bcc
        seen: set[str] = set()
        self.to = unique_addresses(self.to, seen)
        self.cc = unique_addresses(self.cc, seen)
        self.bcc = unique_addresses(self.bcc, seen)
        check_message_rules(
            self.text, self.html, self.from_, len(self.to) + len(self.cc) + len(self.bcc),
            info, MAX_RECIPIENTS,
        )  # fmt: skip
        return self

    def envelope_recipients(self) -> list[str]:
        """The bare addresses (RCPT TO), display names left to the headers."""
        return [str(mailbox) for mailbox in (*self.to, *self.cc, *self.bcc)]


def validation_context(settings: Settings, max_recipients: int) -> dict[str, object]:
    """What EmailSpec and NewsletterSpec check beyond their fields, from the settings: the API
    and the worker validate with the same context."""
    return {
        "max_recipients": max_recipients,
        "allowed_sender_domains": settings.sender_domains,
        "allow_local_domains": settings.mail_allow_local_domains,
        "max_attachment_bytes": settings.mail_max_attachment_bytes,
        "max_total_attachment_bytes": settings.mail_max_total_attachment_bytes,
        "scrape_allowed_cidrs": settings.scrape_allowed_cidrs,  # a URL attachment's guard
        "scrape_allowed_ports": settings.scrape_allowed_ports,
    }


def check_message_rules(
    text: str | None,
    html: str | None,
    sender: str | None,
    recipients: int,
    info: ValidationInfo,
    max_recipients: int,
) -> None:
    """Rules JSON Schema cannot say, shared by single emails and newsletters. Settings arrive as
    validation context: `max_recipients` and `allowed_sender_domains` (no open relay)."""
    if not (text or html):
        raise ValueError("give 'text', 'html' or both")
    context = info.context or {}
    limit = context.get("max_recipients", max_recipients)
    if recipients > limit:
        raise ValueError(f"{recipients} recipients is more than the limit of {limit}")
    allowed = context.get("allowed_sender_domains")
    if sender and allowed and domain_of(sender) not in allowed:
        raise ValueError(f"sender domain {domain_of(sender)!r} is not allowed")


def build_message(
    spec: EmailSpec,
    default_from: str,
    message_id: str,
    attachments: Sequence[bytes] | None = None,
) -> Message:
    """Plain text and/or HTML; both present gives multipart/alternative; attachments make it
    multipart/mixed. `attachments`: their bytes, in order, as `load_attachments` gives them
    (None: the spec's inline ones; a URL's must be fetched first).

    Built with the email package's compat32 MIME classes, which write the headers they are
    given instead of parsing each one into a structured header object: about 4x less CPU per
    message than `EmailMessage`, which matters when one process sends hundreds per second.
    Every value is already a single line (see EmailSpec). Display names are quoted, or RFC
    2047-encoded when not ASCII; other values are encoded when not ASCII or too long a word
    to fold, so that no line passes 998 bytes (jobs.mail.headers). An address that is not
    ASCII (SMTPUTF8) takes `EmailMessage`, which knows how to write it (jobs.mail.intl).
    """
    sender = spec.from_ or default_from
    bodies = _attachment_bodies(spec, attachments)
    address_headers = _address_headers(spec, sender)
    if not all(address.isascii() for _, mailboxes in address_headers for address in mailboxes):
        return _build_email_message(spec, sender, message_id, bodies)
    message: Message
    if spec.text is not None and spec.html is not None:
        message = MIMEMultipart("alternative", boundary=_boundary())
        message.attach(_text_part(spec.text, "plain"))
        message.attach(_text_part(spec.html, "html"))
    else:
        message = _text_part(spec.text if spec.text is not None else spec.html or "",
                             "plain" if spec.text is not None else "html")  # fmt: skip
    if bodies:
        mixed = MIMEMultipart("mixed", boundary=_boundary())
        mixed.attach(message)
        for attachment, body in zip(spec.attachments, bodies, strict=True):
            mixed.attach(mime_part(attachment, body))
        message = mixed
    for name, mailboxes in address_headers:
        message[name] = address_list(mailboxes)
    for name, value in _other_headers(spec, message_id):
        # a Header object is what compat32 expects for an encoded value (typeshed says str)
        message[name] = cast(str, header_value(name, value))
    return message


def _boundary() -> str:
    """96 random bits: no body contains it, and the Content-Type line stays under 78."""
    return f"=_{uuid4().hex[:24]}"


def _attachment_bodies(spec: EmailSpec, given: Sequence[bytes] | None) -> list[bytes]:
    if given is not None:
        if len(given) != len(spec.attachments):
            raise ValueError(f"{len(given)} attachment bodies for {len(spec.attachments)}")
        return list(given)
    inline = [attachment.inline_bytes() for attachment in spec.attachments]
    bodies = [body for body in inline if body is not None]
    if len(bodies) != len(inline):
        raise ValueError("an attachment's URL is fetched first: see load_attachments")
    return bodies


def _text_part(body: str, subtype: str) -> Message:
    """The part `MIMEText(body, subtype, charset)` makes, byte for byte (us-ascii and 7bit, or
    utf-8 and base64 in 76-character lines: tests/mail/test_email_jobs.py compares them), without
    its charset and parameter machinery: the largest share of building a message."""
    plain = body.isascii()
    part = Message()
    part["Content-Type"] = f'text/{subtype}; charset="{"us-ascii" if plain else "utf-8"}"'
    part["MIME-Version"] = "1.0"
    part["Content-Transfer-Encoding"] = "7bit" if plain else "base64"
    part.set_payload(body if plain else base64.encodebytes(body.encode()).decode("ascii"))
    return part


@functools.lru_cache(maxsize=1)
def _date_header(second: int) -> str:
    """The Date header of every message sent within one second: formatted once."""
    return format_datetime(datetime.fromtimestamp(second, UTC))


def _address_headers(spec: EmailSpec, sender: str) -> list[tuple[str, Sequence[str]]]:
    """From, To, Cc and Reply-To, in that order: their mailboxes (Bcc is never a header)."""
    headers: list[tuple[str, Sequence[str]]] = [("From", [sender]), ("To", spec.to)]
    if spec.cc:
        headers.append(("Cc", spec.cc))
    if spec.reply_to:
        headers.append(("Reply-To", [spec.reply_to]))
    return headers


def _other_headers(spec: EmailSpec, message_id: str) -> list[tuple[str, str]]:
    return [
        ("Subject", spec.subject),
        ("Date", _date_header(int(time.time()))),
        ("Message-ID", message_id),
        *spec.headers.items(),
    ]


def _build_email_message(
    spec: EmailSpec, sender: str, message_id: str, attachments: Sequence[bytes]
) -> EmailMessage:
    message = EmailMessage()
    for name, mailboxes in _address_headers(spec, sender):
        message[name] = [_header_address(mailbox) for mailbox in mailboxes]
    for name, value in _other_headers(spec, message_id):
        message[name] = value
    if spec.text is not None:
        message.set_content(spec.text)
        if spec.html is not None:
            message.add_alternative(spec.html, subtype="html")
    else:
        message.set_content(spec.html or "", subtype="html")
    for attachment, body in zip(spec.attachments, attachments, strict=True):
        add_to(message, attachment, body)
    return message


def _header_address(mailbox: str) -> HeaderAddress:
    name = mailbox.name if isinstance(mailbox, Mailbox) else None
    local, _, domain = mailbox.rpartition("@")  # not addr_spec=: it refuses a UTF-8 local part
    return HeaderAddress(display_name=name or "", username=local, domain=domain)


async def record_sent(
    redis: Redis, message_id: str, batch_id: str | None, settings: Settings
) -> None:
    """The sent marker (and batch progress), right after the server said 250. A message of no
    batch needs one SET. With REDIS_WAIT_REPLICAS, also a WAIT, so a failover cannot lose the
    marker and send the message again; a WAIT that times out is logged (the message is sent
    either way)."""
    ttl = int(settings.sent_marker_ttl)
    if not batch_id and not settings.redis_wait_replicas:
        await redis.set(SENT_KEY_PREFIX + message_id, "1", ex=ttl)
        return
    async with redis.pipeline(transaction=False) as pipe:
        if batch_id:  # the marker and the batch's count (which may release its callback)
            await count_in_batch(redis, batch_id, [message_id], "sent", ttl, pipe, sent_marker=True)
        else:
            pipe.set(SENT_KEY_PREFIX + message_id, "1", ex=ttl)
        try:
            await execute_replicated(pipe, settings)
        except NotReplicatedError as exc:
            log.warning("email %s: sent marker not replicated: %s", message_id, exc)


async def batch_aborted(redis: Redis, batch_id: str) -> bool:
    """Whether the message's newsletter was aborted (jobs.mail.newsletter.abort_batch)."""
    key = MAIL_BATCH_KEY_PREFIX + batch_id
    return bool(await redis.hexists(key, BATCH_ABORTED_FIELD))  # type: ignore[misc]


async def record_failed(ctx: WorkerContext, kwargs: dict[str, Any]) -> None:
    """Dead-letter hook: count the message as failed in its batch's progress (unless some
    recipient has it: see jobs.mail.outcomes)."""
    batch_id, message_id = kwargs.get("batch_id"), kwargs.get("message_id")
    if batch_id and message_id:
        await count_failed(ctx.redis, message_id, batch_id, int(ctx.settings.sent_marker_ttl))


# `<left@right>`: no space or control character (CR, LF above all), angle brackets only around
# it (RFC 5322; a sender's internationalized domain may appear on the right)
MESSAGE_ID = re.compile(r"<[^\s<>@\x00-\x1f\x7f]{1,250}@[^\s<>\x00-\x1f\x7f]{1,250}>")


def check_message_id(message_id: str) -> None:
    """A Message-ID goes into a header and a Redis key: anything but `<left@right>` without
    spaces or control characters (a CR or LF above all) is refused, for good."""
    if not isinstance(message_id, str) or not MESSAGE_ID.fullmatch(message_id):
        raise PermanentJobError(f"message_id {message_id!r} is not <left@right> on one line")


@builtin(
    "send_email",
    "email",
    priority="transactional",
    endpoint="email",
    schedulable=True,
    on_dead_letter=record_failed,
    shown=("email.to", "email.subject"),
)
async def send_email(
    ctx: WorkerContext,
    email: dict[str, Any],
    message_id: str,
    batch_id: str | None = None,
    recipients: list[str] | None = None,
    previous: Any = None,
) -> dict[str, Any]:
    """arq job: send one message at most once, however often the job itself runs.

    `previous`: the result of the job it follows (`then`): an export's file is attached
    (jobs.mail.attachments.with_parent_export); any other result is ignored.

    arq runs a job at least once (again after a worker crash). The sent marker turns that into
    effectively-once delivery: it is written as soon as the server accepts the message, before
    that SMTP connection carries anything else (see SmtpPool.send). The one window left is the
    message's final reply: a crash after the server has the whole message (the final ".") and
    before the marker is written sends it again on the re-run, with the same Message-ID. At
    most one message per open SMTP connection (SMTP_MAX_CONNECTIONS) is in that window.

    Per recipient (jobs.mail.outcomes): a retry goes to the recipients a 4xx deferred, those
    refused with a 5xx are dead-lettered (under this job's id, `recipients` naming them) while
    the job completes for the others, and the result gives each recipient's answer.
    """
    settings = ctx.settings
    redis = ctx.redis
    check_message_id(message_id)  # a plain arq producer's is not checked by the API
    sent, answers = await recorded_answers(redis, message_id)  # one round trip
    if sent:
        await record_sent(redis, message_id, batch_id, settings)
        report(f"email {message_id} already sent; not sending again", message_id=message_id)
        return {"message_id": message_id, "skipped": "already sent"}
    if batch_id and await batch_aborted(redis, batch_id):
        ttl = int(settings.sent_marker_ttl)
        await count_in_batch(redis, batch_id, [message_id], "aborted", ttl)
        return {"message_id": message_id, "skipped": "newsletter aborted"}
    context = validation_context(settings, settings.mail_max_recipients)
    email = with_parent_export(email, job_id_of(ctx), previous)  # a dead letter keeps it
    spec = EmailSpec.model_validate(email, context=context)  # the queue is a boundary too
    envelope = spec.envelope_recipients()
    part = job_recipients(envelope, recipients)  # all, or a dead letter's refused ones
    delivery = Delivery(message_id, job_id_of(ctx), envelope, part, answers)
    outcome = None
    if delivery.to_send():  # else a re-run after every recipient had answered
        attachments = await load_attachments(ctx, spec.attachments)  # URLs: fetched per try
        message = build_message(spec, settings.mail_from, message_id, attachments)
        if send_rate := ctx.send_rate:
            await send_rate.wait_for_slot()
        await replicas_ready(redis, settings)  # REDIS_WAIT_REPLICAS: the marker must be durable
        marker = functools.partial(record_sent, redis, message_id, batch_id, settings)
        outcome = await send_part(ctx, message, delivery, batch_id, marker)
    if outcome is not None:
        if monitor := ctx.monitor:
            monitor.count("emails_sent")
            if refused := refused_for_good(outcome):
                monitor.count("recipients_refused", n=len(refused))
        report(
            f"email {message_id} sent to {len(outcome.accepted)} recipient(s)",
            message_id=message_id, recipients=len(outcome.accepted),
        )  # fmt: skip
    delivery.settle()  # raises while deferred recipients wait, or if none will ever have it
    if refused := delivery.having("refused"):  # the others have it: partial success
        log.warning(
            "email %s: %d of %d recipient(s) refused for good, dead-lettered: %s",
            message_id, len(refused), len(part), delivery.detail(refused),
        )  # fmt: skip
        arguments = {"email": email, "message_id": message_id, "batch_id": batch_id}
        await dead_letter_refused(ctx, delivery, arguments)
    return delivery.result(outcome.response if outcome else "")
