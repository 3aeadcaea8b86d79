"""Bulk email: one parent job renders per-recipient messages and fans them out as email jobs.

Each recipient becomes an ordinary `send_email` job with a job id and Message-ID derived from the
newsletter id, so a re-run of the parent enqueues nothing twice and sends nothing twice. Progress
is the size of the batch's sent / failed / aborted sets of Message-IDs, written by one script
(jobs/mail/lua/batch_record.lua, through jobs.mail.outcomes.count_in_batch): a message recorded
twice (a job re-run after a kill) is counted once.

A newsletter's `callback` (a job or a URL, as a batch's) is written when it is enqueued, waiting
on a count (jobs.engine.dependencies.enqueue_counted_callback), and the batch hash names it. The
script that records a message's outcome releases it in the same call once every recipient is
settled: sent, failed for good (invalid ones at the fan-out included) or aborted. Recipients the
fan-out never enqueued (the newsletter aborted, or its job failed for good, midway) are settled
by `settle_rest`, which counts every message that has no outcome and no job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis
from arq.jobs import deserialize_job
from jinja2 import Template, TemplateSyntaxError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from asyncjobs.addresses import (
    MAX_NAME_CHARS,
    Address,
    Mailbox,
    address_of,
    check_display_name,
    message_id_domain,
    split_mailbox,
    unique_addresses,
)
from asyncjobs.arqcompat import job_key_prefix
from asyncjobs.keys import BATCH_ABORTED_FIELD, MAIL_BATCH_KEY_PREFIX, mail_batch_key
from asyncjobs.settings import Settings
from jobs.context import WorkerContext
from jobs.enqueue import enqueue_registered_many
from jobs.mail.email import (
    MAX_BODY_CHARS,
    EmailSpec,
    batch_aborted,
    check_message_rules,
    validation_context,
)
from jobs.mail.headers import header_name
from jobs.mail.outcomes import BatchOutcome, count_in_batch
from jobs.mail.sandbox import html_env, render, text_env
from jobs.retry import builtin

log = logging.getLogger(__name__)

HARD_MAX_RECIPIENTS = 100_000
ENQUEUE_CHUNK = 500
# a batch hash without a TTL (none is written without one): its sets kept for SENT_MARKER_TTL's
# default
DEFAULT_SETS_TTL_S = 7 * 24 * 3600


class Recipient(BaseModel):
    """An address, its display name if any (the template variable `name`, unless `vars` has
    one) and its template variables."""

    model_config = ConfigDict(extra="forbid")

    email: Address
    name: str | None = Field(None, max_length=MAX_NAME_CHARS)
    vars: dict[str, str | int | float | bool | None] = Field(default_factory=dict, max_length=50)

    @field_validator("name")
    @classmethod
    def _one_line(cls, name: str | None) -> str | None:
        return None if name is None else check_display_name(name)

    @model_serializer(mode="wrap")
    def _without_an_empty_name(self, handler: SerializerFunctionWrapHandler) -> Any:
        """As before names were taken, when there is none: 10,000 recipients, 10,000 nulls."""
        fields = handler(self)
        if isinstance(fields, dict) and fields.get("name") is None:
            fields.pop("name", None)
        return fields

    def mailbox(self) -> str | dict[str, str]:
        """As the email's `to` takes it."""
        return self.email if self.name is None else {"name": self.name, "email": self.email}


class NewsletterSpec(BaseModel):
    """`POST /jobs/newsletter`: Jinja2 templates rendered once per recipient with its `vars`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    recipients: list[Recipient] = Field(min_length=1, max_length=HARD_MAX_RECIPIENTS)
    subject: str = Field(min_length=1, max_length=998)
    text: str | None = Field(None, max_length=MAX_BODY_CHARS)
    html: str | None = Field(None, max_length=MAX_BODY_CHARS)
    from_: Mailbox | None = Field(None, alias="from")
    reply_to: Mailbox | None = None
    headers: dict[str, str] = Field(default_factory=dict, max_length=20)

    @field_validator("recipients", mode="before")
    @classmethod
    def _plain_addresses(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [_recipient_fields(r) if isinstance(r, str) else r for r in value]
        return value

    @field_validator("subject", "text", "html")
    @classmethod
    def _compiles(cls, template: str | None) -> str | None:
        if template is not None:
            try:
                text_env.parse(template)
            except TemplateSyntaxError as exc:
                raise ValueError(f"template error on line {exc.lineno}: {exc.message}") from exc
            except RecursionError:  # ((((...)))) or {% if %} thousands deep: Jinja2 recurses
                raise ValueError(
                    "template nests too deeply (expressions or blocks inside each other)"
                ) from None
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


def _recipient_fields(text: str) -> dict[str, str]:
    """`ada@example.com` or `Ada Lovelace <ada@example.com>` as a Recipient's fields."""
    name, address = split_mailbox(text)
    return {"email": text} if name is None else {"email": address, "name": name}


@dataclass(frozen=True)
class Templates:
    """A newsletter's templates, compiled once per chunk of recipients (a few ms each), not
    once per recipient."""

    subject: Template
    text: Template | None
    html: Template | None

    @classmethod
    def compile(cls, spec: NewsletterSpec) -> Templates:
        return cls(
            subject=text_env.from_string(spec.subject),
            text=text_env.from_string(spec.text) if spec.text else None,
            html=html_env.from_string(spec.html) if spec.html else None,
        )


class RenderError(ValueError):
    """One recipient's variables made a template fail: that recipient fails, not the rest."""


def render_for(
    spec: NewsletterSpec, templates: Templates, recipient: Recipient, context: dict[str, object]
) -> dict[str, Any]:
    """One recipient's EmailSpec as job arguments; raises ValidationError if the result is not
    a valid email, RenderError if the recipient's variables break a template."""
    named = {"name": recipient.name} if recipient.name is not None else {}
    variables = {"email": recipient.email, **named, **recipient.vars}
    try:
        subject = render(templates.subject, variables)
        text = render(templates.text, variables) if templates.text else None
        html = render(templates.html, variables) if templates.html else None
    except Exception as exc:  # the sandbox's errors and whatever the template itself raises
        raise RenderError(f"template failed: {type(exc).__name__}: {exc}") from exc
    email = EmailSpec.model_validate(
        {
            "to": [recipient.mailbox()],
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


Rendered = tuple[dict[str, Any] | None, str | None]  # (job arguments, or why not)


def render_chunk(
    newsletter: dict[str, Any], contexts: tuple[dict[str, object], dict[str, object]]
) -> list[Rendered]:
    """The newsletter's recipients (a chunk of them) rendered: their email job arguments, or
    the reason one cannot be sent. Runs in a pool process under a deadline (jobs.cpulimit):
    the templates are a caller's code, and their cost is the caller's choice. `contexts`: the
    newsletter's validation context and its messages'."""
    newsletter_context, context = contexts
    spec = NewsletterSpec.model_validate(newsletter, context=newsletter_context)
    templates = Templates.compile(spec)
    rendered: list[Rendered] = []
    for recipient in spec.recipients:
        try:
            rendered.append((render_for(spec, templates, recipient, context), None))
        except ValidationError as exc:
            rendered.append((None, f"{recipient.email}: {exc.errors()[0]['msg']}"))
        except RenderError as exc:
            rendered.append((None, f"{recipient.email}: {exc}"))
    return rendered


def checked_newsletter(newsletter: dict[str, Any], context: dict[str, object]) -> dict[str, Any]:
    """The newsletter as NewsletterSpec takes it (templates parsed, addresses checked and
    de-duplicated), as JSON; ValidationError if it is not valid. For the CPU pool: 10,000
    addresses or a 500 KB template cost the event loop seconds."""
    spec = NewsletterSpec.model_validate(newsletter, context=context)
    return spec.model_dump(mode="json", by_alias=True)


def child_job_id(newsletter_id: str, index: int) -> str:
    return f"{newsletter_id}-{index}"


def child_message_id(newsletter_id: str, index: int, sender: str | dict[str, Any]) -> str:
    """`sender` as the newsletter's `from` is stored: an address, or {name, email}."""
    return _message_id(newsletter_id, index, sender_domain(sender))


def sender_domain(sender: str | dict[str, Any]) -> str:
    """The right side of the newsletter's Message-IDs (kept in its batch hash: `settle_rest`
    names its messages without the newsletter's arguments)."""
    return message_id_domain(address_of(sender))


def _message_id(newsletter_id: str, index: int, domain: str) -> str:
    return f"<{newsletter_id}.{index}@{domain}>"


async def enqueue_children(
    redis: ArqRedis, settings: Settings, jobs: list[tuple[str, dict[str, Any]]]
) -> None:
    """The messages' `send_email` jobs, pipelined; a child that exists (a re-run of the
    fan-out) is not enqueued again."""
    calls = [(kwargs, job_id) for job_id, kwargs in jobs]
    await enqueue_registered_many(redis, settings, "send_email", calls)


async def settle_rest(
    redis: Redis, newsletter_id: str, outcome: BatchOutcome, first: int = 0
) -> int:
    """Count as `outcome` each message of the newsletter, from index `first`, that has no
    outcome and no job: the recipients its fan-out never enqueued (it was aborted, or failed
    for good, midway) and messages whose job ended without recording one (aborted on their
    own). Only for a newsletter with a callback (whose release needs every recipient settled);
    idempotent, a script call per ENQUEUE_CHUNK messages. How many it counted."""
    key = MAIL_BATCH_KEY_PREFIX + newsletter_id
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hmget(key, ["total", "callback", "domain"])
        pipe.ttl(key)
        (total, callback, domain), ttl = await pipe.execute()
    if total is None or callback is None or domain is None:
        return 0
    ttl = ttl if ttl > 0 else DEFAULT_SETS_TTL_S  # the sets live as long as the batch hash
    counted = 0
    for start in range(first, int(total), ENQUEUE_CHUNK):
        indexes = range(start, min(int(total), start + ENQUEUE_CHUNK))
        message_ids = [_message_id(newsletter_id, i, domain.decode()) for i in indexes]
        jobs = [child_job_id(newsletter_id, i) for i in indexes]
        counted += await count_in_batch(
            redis, newsletter_id, message_ids, outcome, ttl, unknown_jobs=jobs
        )
    return counted


async def abort_message(redis: ArqRedis, job_id: str) -> bool:
    """A newsletter message's job aborted on its own (`DELETE /jobs/<newsletter>-<n>`): its
    message counts as aborted in the newsletter's progress now, so a callback waiting for every
    message does not wait for it for ever (a job aborted before it runs records nothing
    itself). A send that had already begun and ends sent moves it to sent (batch_record.lua
    counts each message once). False for a job of no newsletter, or one already gone."""
    raw = await redis.get(job_key_prefix + job_id)
    if raw is None:
        return False
    kwargs = deserialize_job(raw, deserializer=redis.job_deserializer).kwargs
    newsletter_id, message_id = kwargs.get("batch_id"), kwargs.get("message_id")
    if not newsletter_id or not message_id:
        return False
    ttl = await redis.ttl(MAIL_BATCH_KEY_PREFIX + newsletter_id)
    ttl = ttl if ttl > 0 else DEFAULT_SETS_TTL_S  # the sets live as long as the batch hash
    await count_in_batch(redis, newsletter_id, [message_id], "aborted", ttl)
    return True


async def settle_failed_fan_out(ctx: WorkerContext, kwargs: dict[str, Any]) -> None:
    """Dead-letter hook of a newsletter: its job failed for good, so the recipients it did not
    enqueue never will be; they are failed (a callback then runs with them counted)."""
    if newsletter_id := kwargs.get("newsletter_id"):
        counted = await settle_rest(ctx.redis, newsletter_id, "failed")
        if counted:
            log.warning("newsletter %s: %d messages never enqueued, failed", newsletter_id, counted)


@builtin(
    "send_newsletter",
    "email",
    endpoint="newsletter",
    schedulable=True,
    on_dead_letter=settle_failed_fan_out,
    shown=("newsletter.subject",),
)
async def send_newsletter(
    ctx: WorkerContext, newsletter_id: str, newsletter: dict[str, Any]
) -> dict[str, Any]:
    settings = ctx.settings
    redis = ctx.redis
    contexts = (  # the newsletter's, as the API checked it, and its messages'
        validation_context(settings, settings.newsletter_max_recipients),
        validation_context(settings, settings.mail_max_recipients),
    )
    # its cost (templates, thousands of addresses) is the caller's choice: off the event loop
    checked = await ctx.run_cpu(
        "the newsletter's validation", checked_newsletter, newsletter, contexts[0]
    )  # recipients de-duplicated
    total = len(checked["recipients"])
    sender = checked.get("from") or settings.mail_from
    invalid: dict[str, str] = {}
    for first in range(0, total, ENQUEUE_CHUNK):
        if await batch_aborted(redis, newsletter_id):
            log.info(
                "newsletter %s: aborted; %d messages not enqueued", newsletter_id, total - first
            )
            await settle_rest(redis, newsletter_id, "aborted", first)
            break
        part = checked | {"recipients": checked["recipients"][first : first + ENQUEUE_CHUNK]}
        rendered = await ctx.run_cpu("the newsletter's templates", render_chunk, part, contexts)
        chunk: list[tuple[str, dict[str, Any]]] = []
        for index, (email, problem) in enumerate(rendered, start=first):
            message_id = child_message_id(newsletter_id, index, sender)
            if email is None:
                invalid[message_id] = problem or "not sent"
                continue
            kwargs = {"email": email, "message_id": message_id, "batch_id": newsletter_id}
            chunk.append((child_job_id(newsletter_id, index), kwargs))
        if chunk:
            await enqueue_children(redis, settings, chunk)
    async with redis.pipeline(transaction=True) as pipe:
        # again, for producers that enqueue a newsletter without the API
        set_total(pipe, newsletter_id, total, settings.sent_marker_ttl, sender_domain(sender))
        if invalid:  # failed for good: counted with the rest (the last may release a callback)
            ttl = int(settings.sent_marker_ttl)
            await count_in_batch(redis, newsletter_id, list(invalid), "failed", ttl, pipe)
        await pipe.execute()
    enqueued = total - len(invalid)
    log.info(
        "newsletter %s: %d messages enqueued, %d invalid", newsletter_id, enqueued, len(invalid)
    )
    return {
        "newsletter_id": newsletter_id,
        "total": total,
        "enqueued": enqueued,
        "invalid": list(invalid.values())[:100],
    }


async def start_progress(
    redis: Redis,
    newsletter_id: str,
    total: int,
    ttl: float,
    sender: str | dict[str, Any] | None = None,
    callback_id: str | None = None,
) -> None:
    """The newsletter's progress exists from its 202 on: every message pending. With
    `callback_id` (a callback waiting on its count, written before), the batch names it, so
    that recording the last outcome releases it; `sender`: the newsletter's `from`."""
    async with redis.pipeline(transaction=True) as pipe:
        set_total(pipe, newsletter_id, total, ttl, sender_domain(sender) if sender else None)
        if callback_id is not None:
            pipe.hset(MAIL_BATCH_KEY_PREFIX + newsletter_id, "callback", callback_id)
        await pipe.execute()


def set_total(
    pipe: Pipeline, newsletter_id: str, total: int, ttl: float, domain: str | None = None
) -> None:
    """Queue on `pipe` the newsletter's message count, which its progress is measured against
    (and the domain of its Message-IDs)."""
    fields: dict[str, str | int] = {"total": total} | ({"domain": domain} if domain else {})
    pipe.hset(MAIL_BATCH_KEY_PREFIX + newsletter_id, mapping=fields)
    pipe.expire(MAIL_BATCH_KEY_PREFIX + newsletter_id, int(ttl))


class BatchProgress(BaseModel):
    total: int
    sent: int
    failed: int
    pending: int
    aborted: int = 0  # once aborted: the messages that will not be sent


async def batch_progress(redis: Redis, batch_id: str) -> BatchProgress | None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hmget(MAIL_BATCH_KEY_PREFIX + batch_id, ["total", BATCH_ABORTED_FIELD])
        pipe.scard(mail_batch_key(batch_id, "sent"))
        pipe.scard(mail_batch_key(batch_id, "failed"))
        (total, aborted), sent, failed = await pipe.execute()
    if total is None:
        return None
    rest = int(total) - sent - failed
    if aborted:  # none of the rest is sent now (one being sent as it came may still go)
        return BatchProgress(total=int(total), sent=sent, failed=failed, pending=0, aborted=rest)
    return BatchProgress(total=int(total), sent=sent, failed=failed, pending=rest)


async def abort_batch(redis: Redis, batch_id: str) -> bool:
    """Stop a newsletter: its fan-out enqueues no more messages and its queued messages are
    not sent (each checks before sending, and counts itself aborted). With a callback, the
    messages never enqueued are counted aborted now (`settle_rest`): the newsletter's own job
    may never get to it (an abort cancels it). False if there is no such newsletter."""
    key = MAIL_BATCH_KEY_PREFIX + batch_id
    async with redis.pipeline(transaction=True) as pipe:
        pipe.exists(key)
        pipe.hsetnx(key, BATCH_ABORTED_FIELD, "1")
        exists, _ = await pipe.execute()
    if not exists:
        await redis.delete(key)  # HSETNX made a hash of one field: not a newsletter
    else:
        await settle_rest(redis, batch_id, "aborted")
    return bool(exists)
