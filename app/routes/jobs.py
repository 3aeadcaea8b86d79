"""/jobs: validate a request, enqueue its job, report on it, abort it.

Each handler is small; the work happens in the worker.
"""

from __future__ import annotations

from aiohttp import web
from arq.jobs import DeserializationError, deserialize_job
from redis.asyncio import Redis

from app import actions
from app.auth import charge_extra, charge_messages
from app.chains import cost_of
from app.http import (
    JOB_ID_PATTERN,
    enqueue,
    enqueue_many,
    json_model,
    off_loop,
    status_url,
    unique_holder,
)
from app.idempotency import idempotent, new_job_id
from app.joboptions import read_job_request
from app.jobstatus import read_job_with_progress
from app.routes.batches import (
    batch_url,
    charge_batch,
    checked_callback,
    checked_newsletter_callback,
    save_batch,
    start_callback,
    start_newsletter_callback,
)
from app.schemas import (
    AbortAccepted,
    EmailAccepted,
    EmailSpec,
    NewsletterAccepted,
    ScrapeAccepted,
    ScrapeBatchAccepted,
    ScrapeRequest,
)
from app.state import REDIS, SETTINGS
from asyncjobs.addresses import new_message_id
from asyncjobs.arqcompat import job_key_prefix
from asyncjobs.jobstate import JobState
from jobs.engine.dependencies import FollowUp
from jobs.engine.unique import is_existing
from jobs.mail.email import validation_context
from jobs.mail.newsletter import checked_newsletter, start_progress


@idempotent
async def enqueue_email(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    context = validation_context(settings, settings.mail_max_recipients)
    options, body = await read_job_request(request)
    spec = EmailSpec.model_validate(body, context=context)
    keyed_id = new_job_id(request) if "Idempotency-Key" in request.headers else None
    job_id: str | None = await unique_holder(request, "send_email", options.unique(), keyed_id)
    message_id = ""
    if job_id is None:
        await charge_messages(request, len(spec.envelope_recipients()))  # one per message sent
        message_id = new_message_id(spec.from_ or settings.mail_from, new_job_id(request))
        job_id = await enqueue(
            request,
            "send_email",
            email=spec.model_dump(mode="json", by_alias=True),
            message_id=message_id,
            **options.enqueue_kwargs(),
        )
    if is_existing(job_id):  # the unique key's email: its own Message-ID
        message_id = await _message_id_of(request.app[REDIS], job_id) or ""
    accepted = EmailAccepted(
        job_id=job_id,
        status_url=status_url(request, job_id),
        message_id=message_id,
        existing=is_existing(job_id),
    )
    return json_model(accepted, status=202)


async def _message_id_of(redis: Redis, job_id: str) -> str | None:
    """The Message-ID of a queued or running email job (None once it has ended)."""
    raw = await redis.get(job_key_prefix + job_id)
    try:
        message_id = deserialize_job(raw).kwargs.get("message_id") if raw else None
    except DeserializationError:
        return None
    return message_id if isinstance(message_id, str) else None


@idempotent
async def enqueue_newsletter(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    context = validation_context(settings, settings.newsletter_max_recipients)
    options, body = await read_job_request(request)
    callback = checked_newsletter_callback(request, body.pop("callback", None))
    newsletter = await off_loop(request, "the newsletter", checked_newsletter, body, context)
    newsletter_id = new_job_id(request)
    total = len(newsletter["recipients"])
    holder = await unique_holder(request, "send_newsletter", options.unique(), newsletter_id)
    if holder is not None:  # the unique key's newsletter, already there: nothing charged
        answer = NewsletterAccepted(
            job_id=holder,
            status_url=status_url(request, holder),
            recipients=total,
            existing=True,
        )
        return json_model(answer, status=202)
    units, messages = cost_of(callback)  # a callback is charged as a batch's is
    await charge_extra(request, units)
    await charge_messages(request, total + messages)
    callback_id = await start_newsletter_callback(request, newsletter_id, total, callback)
    sender = newsletter.get("from") or settings.mail_from
    await start_progress(
        request.app[REDIS], newsletter_id, total, settings.sent_marker_ttl, sender, callback_id
    )
    job_id = await enqueue(
        request,
        "send_newsletter",
        newsletter_id=newsletter_id,
        newsletter=newsletter,
        _job_id=newsletter_id,
        **options.enqueue_kwargs(),
    )
    accepted = NewsletterAccepted(
        job_id=job_id,
        status_url=status_url(request, job_id),
        recipients=total,
        existing=is_existing(job_id),
        callback_job_id=callback_id,
    )
    return json_model(accepted, status=202)


@idempotent
async def enqueue_scrape(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    context = {"max_urls": settings.max_urls_per_request, "max_selectors": settings.max_selectors}
    options, body = await read_job_request(request)
    scrape = ScrapeRequest.model_validate(body, context=context)
    targets = scrape.targets()
    if scrape.url is None and options.unique_key is not None:
        raise web.HTTPUnprocessableEntity(
            text="unique_key names one job: give it with 'url', not with a batch of 'urls'"
        )
    if scrape.url is None and options.dependencies() is not None:
        raise web.HTTPUnprocessableEntity(
            text="'after' and 'then' take one job: give them with 'url', not with a batch of "
            "'urls' (a batch's 'callback' runs once all its pages have ended)"
        )
    callback = checked_callback(request, scrape.callback)  # before anything is stored
    pages = [FollowUp("scrape", {})] * len(targets)  # charged as its jobs, as a batch's are
    await charge_batch(request, pages + ([callback] if callback is not None else []))
    # one page is someone waiting; a batch is bulk work
    extra = options.enqueue_kwargs(None if scrape.url is not None else "bulk")
    calls = [{"target": target.model_dump(mode="json"), **extra} for target in targets]
    batch_id = new_job_id(request)
    if scrape.url is None:  # a batch's jobs are named after it, so that lists group them
        calls = [{"_job_id": f"{batch_id}-{n}"} | call for n, call in enumerate(calls)]
        job_ids = await enqueue_many(request, "scrape", calls)
    else:  # one job, as any other: with its after and then (which enqueue charges)
        job_ids = [await enqueue(request, "scrape", **calls[0])]
    accepted = [
        ScrapeAccepted(
            job_id=job_id,
            status_url=status_url(request, job_id),
            url=str(target.url),
            existing=is_existing(job_id),
        )
        for job_id, target in zip(job_ids, targets, strict=True)
    ]
    if scrape.url is not None:
        return json_model(accepted[0], status=202)
    await save_batch(request.app[REDIS], batch_id, accepted)
    callback_id = await start_callback(request, batch_id, job_ids, callback)
    batch = ScrapeBatchAccepted(
        batch_id=batch_id,
        batch_url=batch_url(request, batch_id),
        jobs=accepted,
        callback_job_id=callback_id,
    )
    return json_model(batch, status=202)


async def job_status(request: web.Request) -> web.Response:
    redis = request.app[REDIS]
    job_id = request.match_info["job_id"]
    view = await read_job_with_progress(redis, request.app[SETTINGS].queue_name, job_id)
    return json_model(view, status=404 if view.status == JobState.NOT_FOUND else 200)


async def abort_job(request: web.Request) -> web.Response:
    """Ask workers to abort a queued, deferred or running job (arq's abort set)."""
    redis = request.app[REDIS]
    queue = request.app[SETTINGS].queue_name
    job_id = request.match_info["job_id"]
    view = await actions.abort(redis, queue, job_id)
    if view.status == JobState.NOT_FOUND:
        raise web.HTTPNotFound(text=f"no job {job_id}")
    if view.status not in actions.ABORTABLE:
        raise web.HTTPConflict(text=f"job {job_id} has already finished ({view.status})")
    accepted = AbortAccepted(
        job_id=job_id, status_url=status_url(request, job_id), status_before=view.status
    )
    return json_model(accepted, status=202)


def add_job_routes(app: web.Application) -> None:
    app.router.add_post("/jobs/email", enqueue_email)
    app.router.add_post("/jobs/newsletter", enqueue_newsletter)
    app.router.add_post("/jobs/scrape", enqueue_scrape)
    app.router.add_get(f"/jobs/{{job_id:{JOB_ID_PATTERN}}}", job_status, name="job_status")
    app.router.add_delete(f"/jobs/{{job_id:{JOB_ID_PATTERN}}}", abort_job)
