"""Email jobs: the validated message spec, MIME building and the arq job that sends it."""

from __future__ import annotations

import base64
import functools
import logging
import re
import time
from datetime import UTC, datetime
from email.header import Header
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

from asyncjobs.addresses import Address, domain_of, unique_addresses
from asyncjobs.errors import PermanentJobError
from asyncjobs.keys import (
    BATCH_ABORTED_FIELD,
    MAIL_BATCH_KEY_PREFIX,
    SENT_KEY_PREFIX,
    mail_batch_key,
)
from asyncjobs.redis import NotReplicatedError, execute_replicated, replicas_ready
from asyncjobs.settings import Settings
from jobs.context import WorkerContext
from jobs.mail.headers import header_name, single_line
from jobs.mail.smtp import SendOutcome
from jobs.retry import builtin, report

log = logging.getLogger(__name__)

# A hard ceiling; settings (passed as validation context) may lower it.
MAX_RECIPIENTS = 1000
MAX_BODY_CHARS = 512 * 1024

SingleLine = Annotated[str, AfterValidator(single_line)]
Recipients = Annotated[list[Address], Field(min_length=1, max_length=MAX_RECIPIENTS)]


class EmailSpec(BaseModel):
    """What a caller may ask for: the body of `POST /jobs/email` and the job's argument."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, str_strip_whitespace=False)

    to: Recipients
    cc: list[Address] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    bcc: list[Address] = Field(default_factory=list, max_length=MAX_RECIPIENTS)
    subject: SingleLine = Field(min_length=1, max_length=998)
    text: str | None = Field(None, max_length=MAX_BODY_CHARS)
    html: str | None = Field(None, max_length=MAX_BODY_CHARS)
    from_: Address | None = Field(None, alias="from")
    reply_to: Address | None = None
    headers: dict[str, SingleLine] = Field(default_factory=dict, max_length=20)

    @field_validator("to", "cc", "bcc", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

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
        return [*self.to, *self.cc, *self.bcc]


def validation_context(settings: Settings, max_recipients: int) -> dict[str, object]:
    """What EmailSpec and NewsletterSpec check beyond their fields, from the settings: the API
    and the worker validate with the same context."""
    return {
        "max_recipients": max_recipients,
        "allowed_sender_domains": settings.sender_domains,
        "allow_local_domains": settings.mail_allow_local_domains,
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


def build_message(spec: EmailSpec, default_from: str, message_id: str) -> Message:
    """Plain text and/or HTML; both present gives multipart/alternative.

    Built with the email package's compat32 MIME classes, which write the headers they are
    given instead of parsing each one into a structured header object: about 4x less CPU per
    message than `EmailMessage`, which matters when one process sends hundreds per second.
    Every value is already a single line (see EmailSpec); non-ASCII ones are RFC 2047-encoded.
    An address that is not ASCII (SMTPUTF8) takes `EmailMessage`, which knows how to write it.
    """
    sender = spec.from_ or default_from
    addresses = [sender, *spec.to, *spec.cc, *([spec.reply_to] if spec.reply_to else [])]
    if not all(address.isascii() for address in addresses):
        return _build_email_message(spec, sender, message_id)
    message: Message
    if spec.text is not None and spec.html is not None:
        # 96 random bits: no body contains it, and the Content-Type line stays under 78
        message = MIMEMultipart("alternative", boundary=f"=_{uuid4().hex[:24]}")
        message.attach(_text_part(spec.text, "plain"))
        message.attach(_text_part(spec.html, "html"))
    else:
        message = _text_part(spec.text if spec.text is not None else spec.html or "",
                             "plain" if spec.text is not None else "html")  # fmt: skip
    headers = _headers(spec, sender, message_id)
    for name, value in headers:
        # a Header object is what compat32 expects for an encoded value (typeshed says str)
        encoded = value if value.isascii() else Header(value, "utf-8", header_name=name)
        message[name] = cast(str, encoded)
    return message


def _text_part(body: str, subtype: str) -> Message:
    """The part `MIMEText(body, subtype, charset)` makes, byte for byte (us-ascii and 7bit, or
    utf-8 and base64 in 76-character lines: tests/test_email_jobs.py compares them), without
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


def _headers(spec: EmailSpec, sender: str, message_id: str) -> list[tuple[str, str]]:
    headers = [("From", sender), ("To", ", ".join(spec.to))]
    if spec.cc:
        headers.append(("Cc", ", ".join(spec.cc)))
    if spec.reply_to:
        headers.append(("Reply-To", spec.reply_to))
    headers += [
        ("Subject", spec.subject),
        ("Date", _date_header(int(time.time()))),
        ("Message-ID", message_id),
        *spec.headers.items(),
    ]
    return headers


def _build_email_message(spec: EmailSpec, sender: str, message_id: str) -> EmailMessage:
    message = EmailMessage()
    for name, value in _headers(spec, sender, message_id):
        message[name] = value
    if spec.text is not None:
        message.set_content(spec.text)
        if spec.html is not None:
            message.add_alternative(spec.html, subtype="html")
    else:
        message.set_content(spec.html or "", subtype="html")
    return message


# KEYS: the sent marker, the batch's sent set, its failed set. ARGV: message id, TTL seconds,
# "1" when the message belongs to a batch.
_RECORD_SENT = """
redis.call('SET', KEYS[1], '1', 'EX', ARGV[2])
if ARGV[3] == '1' then
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('SREM', KEYS[3], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return 1
"""


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
    keys = [SENT_KEY_PREFIX + message_id]
    keys += (
        [mail_batch_key(batch_id, "sent"), mail_batch_key(batch_id, "failed")]
        if batch_id
        else ["-", "-"]
    )
    script = redis.register_script(_RECORD_SENT)
    async with redis.pipeline(transaction=False) as pipe:
        await script(keys=keys, args=[message_id, ttl, "1" if batch_id else "0"], client=pipe)
        try:
            await execute_replicated(pipe, settings)
        except NotReplicatedError as exc:
            log.warning("email %s: sent marker not replicated: %s", message_id, exc)


async def batch_aborted(redis: Redis, batch_id: str) -> bool:
    """Whether the message's newsletter was aborted (jobs.mail.newsletter.abort_batch)."""
    key = MAIL_BATCH_KEY_PREFIX + batch_id
    return bool(await redis.hexists(key, BATCH_ABORTED_FIELD))  # type: ignore[misc]


async def record_failed(ctx: WorkerContext, kwargs: dict[str, Any]) -> None:
    """Dead-letter hook: count the message as failed in its batch's progress."""
    batch_id, message_id = kwargs.get("batch_id"), kwargs.get("message_id")
    if batch_id and message_id:
        key = mail_batch_key(batch_id, "failed")
        async with ctx.redis.pipeline(transaction=True) as pipe:
            pipe.sadd(key, message_id)
            pipe.expire(key, int(ctx.settings.sent_marker_ttl))
            await pipe.execute()


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
    ctx: WorkerContext, email: dict[str, Any], message_id: str, batch_id: str | None = None
) -> dict[str, Any]:
    """arq job: send one message at most once, however often the job itself runs.

    arq runs a job at least once (again after a worker crash). The sent marker turns that into
    effectively-once delivery: it is written as soon as the server accepts the message, before
    that SMTP connection carries anything else (see SmtpPool.send). The one window left is the
    message's final reply: a crash after the server has the whole message (the final ".") and
    before the marker is written sends it again on the re-run, with the same Message-ID. At
    most one message per open SMTP connection (SMTP_MAX_CONNECTIONS) is in that window.
    """
    settings = ctx.settings
    redis = ctx.redis
    check_message_id(message_id)  # a plain arq producer's is not checked by the API
    if await redis.exists(SENT_KEY_PREFIX + message_id):
        await record_sent(redis, message_id, batch_id, settings)
        report(f"email {message_id} already sent; not sending again", message_id=message_id)
        return {"message_id": message_id, "skipped": "already sent"}
    if batch_id and await batch_aborted(redis, batch_id):
        return {"message_id": message_id, "skipped": "newsletter aborted"}
    context = validation_context(settings, settings.mail_max_recipients)
    spec = EmailSpec.model_validate(email, context=context)  # the queue is a boundary too
    message = build_message(spec, settings.mail_from, message_id)
    if send_rate := ctx.send_rate:
        await send_rate.wait_for_slot()
    await replicas_ready(redis, settings)  # REDIS_WAIT_REPLICAS: the marker must be durable

    async def mark_sent(_: SendOutcome) -> None:
        await record_sent(redis, message_id, batch_id, settings)

    outcome = await ctx.smtp.send(message, spec.envelope_recipients(), on_accepted=mark_sent)
    if monitor := ctx.monitor:
        monitor.count("emails_sent")
        if outcome.refused:
            monitor.count("recipients_refused", n=len(outcome.refused))
    report(
        f"email {message_id} sent to {len(outcome.accepted)} recipient(s)",
        message_id=message_id, recipients=len(outcome.accepted),
    )  # fmt: skip
    if outcome.refused:  # the server took the message for the others: not an error, a warning
        log.warning(
            "email %s: %d of %d recipient(s) refused: %s",
            message_id, len(outcome.refused), len(spec.envelope_recipients()),
            "; ".join(f"{rcpt}: {why}" for rcpt, why in outcome.refused.items()),
        )  # fmt: skip
    return {
        "message_id": message_id,
        "accepted": outcome.accepted,
        "refused": outcome.refused,
        "smtp_response": outcome.response,
    }
