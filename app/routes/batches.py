"""Batches: the jobs of one multi-URL `POST /jobs/scrape`, or of one `POST /batches` (several
job requests at once), under one id; their progress; and a batch's `callback`, run once when all
its jobs have ended (jobs/engine/dependencies.py), or a newsletter's, once all its messages are
settled (jobs/mail/newsletter.py)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from itertools import groupby
from typing import Any

from aiohttp import web
from pydantic import ValidationError
from redis.asyncio import Redis

from app.auth import charge_messages, charge_more
from app.chains import CallbackSpec, callback_of, cost_of, job_call
from app.http import json_model, owner_of, read_json_object, status_url
from app.idempotency import idempotent, new_job_id
from app.jobstatus import read_jobs
from app.schemas import (
    BatchAccepted,
    BatchRequest,
    ScrapeAccepted,
    ScrapeBatch,
    ScrapeBatchJob,
)
from app.state import REDIS, SETTINGS
from asyncjobs.jobstate import FINISHED
from asyncjobs.keys import HEX_ID_PATTERN, SCRAPE_BATCH_KEY_PREFIX
from jobs.engine.dependencies import FollowUp, enqueue_callback, enqueue_counted_callback
from jobs.engine.queue import OWNER_KWARG, enqueue_jobs
from jobs.mail.outcomes import BATCH_OUTCOMES

BATCH_TTL_S = 24 * 3600
BATCH_ID_PATTERN = HEX_ID_PATTERN


async def save_batch(redis: Redis, batch_id: str, jobs: list[ScrapeAccepted]) -> None:
    entries = [{"job_id": job.job_id, "url": job.url} for job in jobs]
    await redis.set(SCRAPE_BATCH_KEY_PREFIX + batch_id, json.dumps(entries), ex=BATCH_TTL_S)


def checked_callback(request: web.Request, spec: CallbackSpec | None) -> FollowUp | None:
    """A batch's callback as the engine enqueues it, checked before anything is stored (a
    422 naming it)."""
    if spec is None:
        return None
    try:
        return callback_of(spec, request.app[SETTINGS])
    except ValueError as exc:
        raise web.HTTPUnprocessableEntity(text=f"callback: {exc}") from None


async def charge_batch(request: web.Request, jobs: list[FollowUp]) -> None:
    """A batch is charged as its jobs would be one by one (the callback job among them; a URL
    callback is free, as a `callback_url` is): every job's cost against the rate limit (the
    request's arrival paid the first unit), every email's messages to the hourly quota."""
    costs = [cost_of(job) for job in jobs]
    await charge_more(request, sum(units for units, _ in costs))
    if messages := sum(n for _, n in costs):
        await charge_messages(request, messages)


async def start_callback(
    request: web.Request, batch_id: str, job_ids: list[str], callback: FollowUp | None
) -> str | None:
    """Enqueue the batch's callback (checked_callback) after its jobs (one already ended is
    counted from its ended marker), for the request's owner; its job id."""
    if callback is None:
        return None
    return await enqueue_callback(request.app[REDIS], batch_id, job_ids, owned(request, callback))


def owned(request: web.Request, callback: FollowUp) -> FollowUp:
    """The callback, as the request's owner's job (a batch's jobs are theirs too)."""
    if owner := owner_of(request):
        return replace(callback, kwargs={OWNER_KWARG: owner} | callback.kwargs)
    return callback


def checked_newsletter_callback(request: web.Request, raw: Any) -> FollowUp | None:
    """A newsletter's `callback` (the body's field, as a batch's), checked before anything is
    stored (a 422 naming it); a URL's POST says `newsletter.finished`."""
    if raw is None:
        return None
    try:
        spec = CallbackSpec.model_validate(raw)
    except ValidationError as exc:
        raise web.HTTPUnprocessableEntity(text=f"callback: {exc}") from None
    callback = checked_callback(request, spec)
    if callback is not None and callback.function == "deliver_webhook":
        payload = callback.kwargs["payload"] | {"event": "newsletter.finished"}
        callback = replace(callback, kwargs=callback.kwargs | {"payload": payload})
    return callback


async def start_newsletter_callback(
    request: web.Request, newsletter_id: str, total: int, callback: FollowUp | None
) -> str | None:
    """Write a newsletter's callback (checked_newsletter_callback), waiting until all `total`
    of its messages are settled (jobs.mail.newsletter), for the request's owner; its job id.
    Before the newsletter is enqueued: nothing can settle before it exists."""
    if callback is None:
        return None
    redis = request.app[REDIS]
    return await enqueue_counted_callback(
        redis, newsletter_id, total, owned(request, callback), BATCH_OUTCOMES
    )


@idempotent
async def post_batch(request: web.Request) -> web.Response:
    """`POST /batches`: several job requests ({type, body}) enqueued together, with an
    optional callback."""
    settings = request.app[SETTINGS]
    try:
        body = await read_json_object(request)
        batch = BatchRequest.model_validate(body, context={"max_jobs": settings.batch_max_jobs})
        calls = [job_call(job.type, job.body, "", settings) for job in batch.jobs]
    except (ValidationError, ValueError) as exc:
        raise web.HTTPUnprocessableEntity(text=str(exc)) from None
    callback = checked_callback(request, batch.callback)  # before anything is stored
    await charge_batch(request, calls + ([callback] if callback is not None else []))
    batch_id = new_job_id(request)
    ids = [f"{batch_id}-{n}" for n in range(len(calls))]
    owner = {OWNER_KWARG: owner_of(request)} if owner_of(request) else {}
    for function, group in groupby(zip(ids, calls, strict=True), key=lambda c: c[1].function):
        prepared = [call.kwargs | {"_job_id": job_id} | owner for job_id, call in group]
        await enqueue_jobs(request.app[REDIS], function, prepared)
    entries = [
        {"job_id": job_id, "type": job.type} for job_id, job in zip(ids, batch.jobs, strict=True)
    ]
    await request.app[REDIS].set(
        SCRAPE_BATCH_KEY_PREFIX + batch_id, json.dumps(entries), ex=BATCH_TTL_S
    )
    callback_id = await start_callback(request, batch_id, ids, callback)
    accepted = BatchAccepted(
        batch_id=batch_id,
        batch_url=batch_url(request, batch_id),
        job_ids=ids,
        callback_job_id=callback_id,
    )
    return json_model(accepted, status=202)


def batch_url(request: web.Request, batch_id: str) -> str:
    return str(request.app.router["scrape_batch"].url_for(batch_id=batch_id))


async def show_batch(request: web.Request) -> web.Response:
    redis = request.app[REDIS]
    batch_id = request.match_info["batch_id"]
    raw = await redis.get(SCRAPE_BATCH_KEY_PREFIX + batch_id)
    if raw is None:
        raise web.HTTPNotFound(text=f"no batch {batch_id} (batches are kept for 24 hours)")
    entries: list[dict[str, str]] = json.loads(raw)
    queue = request.app[SETTINGS].queue_name
    views = await read_jobs(redis, queue, [entry["job_id"] for entry in entries])
    jobs = [
        ScrapeBatchJob(
            job_id=view.job_id,
            url=entry.get("url"),
            type=entry.get("type"),
            status=view.status,
            status_url=status_url(request, view.job_id),
        )
        for entry, view in zip(entries, views, strict=True)
    ]
    by_status = Counter(job.status for job in jobs)
    batch = ScrapeBatch(
        batch_id=batch_id,
        total=len(jobs),
        finished=sum(n for status, n in by_status.items() if status in FINISHED),
        by_status=dict(sorted(by_status.items())),
        jobs=jobs,
    )
    return json_model(batch)


def add_batch_routes(app: web.Application) -> None:
    app.router.add_post("/batches", post_batch)
    app.router.add_get(f"/batches/{{batch_id:{BATCH_ID_PATTERN}}}", show_batch, name="scrape_batch")
