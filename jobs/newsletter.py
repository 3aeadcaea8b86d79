"""Bulk email: one parent job renders per-recipient messages and fans them out as email jobs.

Each recipient becomes an ordinary `send_email` job with a job id and Message-ID derived from the
newsletter id, so a re-run of the parent enqueues nothing twice and sends nothing twice. Progress
is the size of the batch's sent / failed sets (see jobs.email.record_sent).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from jinja2 import Template, TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from redis.asyncio import Redis

from jobs.addresses import Address, unique_addresses
from jobs.email import (
    BATCH_KEY_PREFIX,
    MAX_BODY_CHARS,
    EmailSpec,
    batch_key,
    check_message_rules,
    domain_of,
    validation_context,
)
from jobs.headers import header_name
from jobs.monitor import count_enqueued
from jobs.retry import classified

log = logging.getLogger(__name__)

HARD_MAX_RECIPIENTS = 100_000
ENQUEUE_CHUNK = 500

# Templates come from API callers: the sandbox keeps them away from Python internals.
_text_env = SandboxedEnvironment(autoescape=False)
_html_env = SandboxedEnvironment(autoescape=True)


class Recipient(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: Address
    vars: dict[str, str | int | float | bool | None] = Field(default_factory=dict, max_length=50)


class NewsletterSpec(BaseModel):
    """`POST /jobs/newsletter`: Jinja2 templates rendered once per recipient with its `vars`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    recipients: list[Recipient] = Field(min_length=1, max_length=HARD_MAX_RECIPIENTS)
    subject: str = Field(min_length=1, max_length=998)
    text: str | None = Field(None, max_length=MAX_BODY_CHARS)
    html: str | None = Field(None, max_length=MAX_BODY_CHARS)
    from_: Address | None = Field(None, alias="from")
    reply_to: Address | None = None
    headers: dict[str, str] = Field(default_factory=dict, max_length=20)

    @field_validator("recipients", mode="before")
    @classmethod
    def _plain_addresses(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"email": r} if isinstance(r, str) else r for r in value]
        return value

    @field_validator("subject", "text", "html")
    @classmethod
    def _compiles(cls, template: str | None) -> str | None:
        if template is not None:
            try:
                _text_env.parse(template)
            except TemplateSyntaxError as exc:
                raise ValueError(f"template error on line {exc.lineno}: {exc.message}") from exc
        return template

    @field_validator("headers")
    @classmethod
    def _header_names(cls, headers: dict[str, str]) -> dict[str, str]:
        for name in headers:
            header_name(name)
        return headers

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> NewsletterSpec:
        # each address once (its first entry's vars): a list pasted twice is not sent twice
        seen: set[str] = set()
        self.recipients = [r for r in self.recipients if unique_addresses([r.email], seen)]
        check_message_rules(
            self.text, self.html, self.from_, len(self.recipients), info, HARD_MAX_RECIPIENTS
        )
        return self


@dataclass(frozen=True)
class Templates:
    """A newsletter's templates, compiled once for all its recipients (a few ms each)."""

    subject: Template
    text: Template | None
    html: Template | None

    @classmethod
    def compile(cls, spec: NewsletterSpec) -> Templates:
        return cls(
            subject=_text_env.from_string(spec.subject),
            text=_text_env.from_string(spec.text) if spec.text else None,
            html=_html_env.from_string(spec.html) if spec.html else None,
        )


class RenderError(ValueError):
    """One recipient's variables made a template fail: that recipient fails, not the rest."""


def render_for(
    spec: NewsletterSpec, templates: Templates, recipient: Recipient, context: dict[str, object]
) -> dict[str, Any]:
    """One recipient's EmailSpec as job arguments; raises ValidationError if the result is not
    a valid email, RenderError if the recipient's variables break a template."""
    variables = {"email": recipient.email, **recipient.vars}
    try:
        subject = templates.subject.render(variables)
        text = templates.text.render(variables) if templates.text else None
        html = templates.html.render(variables) if templates.html else None
    except Exception as exc:  # the sandbox's errors and whatever the template itself raises
        raise RenderError(f"template failed: {type(exc).__name__}: {exc}") from exc
    email = EmailSpec.model_validate(
        {
            "to": [recipient.email],
            "subject": subject,
            "text": text,
            "html": html,
            "from": spec.from_,
            "reply_to": spec.reply_to,
            "headers": spec.headers,
        },
        context=context,
    )
    return email.model_dump(mode="json", by_alias=True)


def child_job_id(newsletter_id: str, index: int) -> str:
    return f"{newsletter_id}-{index}"


def child_message_id(newsletter_id: str, index: int, sender: str) -> str:
    return f"<{newsletter_id}.{index}@{domain_of(sender) or 'localhost'}>"


async def enqueue_children(
    redis: Redis, queue: str, jobs: list[tuple[str, dict[str, Any]]]
) -> None:
    """Pipelined arq enqueue of many `send_email` jobs; NX keeps a re-run from duplicating."""
    now = timestamp_ms()
    async with redis.pipeline(transaction=False) as pipe:
        for job_id, kwargs in jobs:
            data = serialize_job("send_email", (), kwargs, None, now)
            pipe.set(job_key_prefix + job_id, data, px=86_400_000, nx=True)
            pipe.zadd(queue, {job_id: now}, nx=True)
        await pipe.execute()


@classified("email")
async def send_newsletter(
    ctx: dict[str, Any], newsletter_id: str, newsletter: dict[str, Any]
) -> dict[str, Any]:
    settings = ctx["settings"]
    redis: Redis = ctx["redis"]
    spec = NewsletterSpec.model_validate(
        newsletter, context=validation_context(settings, settings.newsletter_max_recipients)
    )
    child_context = validation_context(settings, settings.mail_max_recipients)
    templates = Templates.compile(spec)
    sender = spec.from_ or settings.mail_from
    invalid: dict[str, str] = {}
    chunk: list[tuple[str, dict[str, Any]]] = []
    for index, recipient in enumerate(spec.recipients):
        message_id = child_message_id(newsletter_id, index, sender)
        try:
            email = render_for(spec, templates, recipient, child_context)
        except ValidationError as exc:
            invalid[message_id] = f"{recipient.email}: {exc.errors()[0]['msg']}"
            continue
        except RenderError as exc:
            invalid[message_id] = f"{recipient.email}: {exc}"
            continue
        kwargs = {"email": email, "message_id": message_id, "batch_id": newsletter_id}
        chunk.append((child_job_id(newsletter_id, index), kwargs))
        if len(chunk) >= ENQUEUE_CHUNK:
            await enqueue_children(redis, settings.queue_name, chunk)
            chunk = []
    if chunk:
        await enqueue_children(redis, settings.queue_name, chunk)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(BATCH_KEY_PREFIX + newsletter_id, mapping={"total": len(spec.recipients)})
        pipe.expire(BATCH_KEY_PREFIX + newsletter_id, int(settings.sent_marker_ttl))
        if invalid:
            pipe.sadd(batch_key(newsletter_id, "failed"), *invalid)
            pipe.expire(batch_key(newsletter_id, "failed"), int(settings.sent_marker_ttl))
        await pipe.execute()
    enqueued = len(spec.recipients) - len(invalid)
    await count_enqueued(redis, "send_email", enqueued)
    log.info(
        "newsletter %s: %d messages enqueued, %d invalid", newsletter_id, enqueued, len(invalid)
    )
    return {
        "newsletter_id": newsletter_id,
        "total": len(spec.recipients),
        "enqueued": enqueued,
        "invalid": list(invalid.values())[:100],
    }


async def start_progress(redis: Redis, newsletter_id: str, total: int, ttl: float) -> None:
    """The newsletter's progress exists from its 202 on: every message pending."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(BATCH_KEY_PREFIX + newsletter_id, mapping={"total": total})
        pipe.expire(BATCH_KEY_PREFIX + newsletter_id, int(ttl))
        await pipe.execute()


class BatchProgress(BaseModel):
    total: int
    sent: int
    failed: int
    pending: int


async def batch_progress(redis: Redis, batch_id: str) -> BatchProgress | None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hget(BATCH_KEY_PREFIX + batch_id, "total")
        pipe.scard(batch_key(batch_id, "sent"))
        pipe.scard(batch_key(batch_id, "failed"))
        total, sent, failed = await pipe.execute()
    if total is None:
        return None
    total = int(total)
    return BatchProgress(total=total, sent=sent, failed=failed, pending=total - sent - failed)
