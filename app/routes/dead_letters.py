"""Dead-letter API: list, inspect, retry (with a fresh try budget) and delete failed jobs."""

from __future__ import annotations

from aiohttp import web

from app import actions
from app.http import JOB_ID_PATTERN, json_model, query_int, status_url
from app.redaction import redact
from app.schemas import DeadLetterPage, JobAccepted
from app.state import REDIS
from jobs.deadletter import (
    DeadLetter,
    get_dead_letter,
    list_dead_letters,
    remove_dead_letter,
)


async def list_entries(request: web.Request) -> web.Response:
    offset = query_int(request, "offset", default=0, lo=0, hi=10_000_000)
    limit = query_int(request, "limit", default=50, lo=1, hi=500)
    total, items = await list_dead_letters(request.app[REDIS], offset, limit)
    page = DeadLetterPage(total=total, offset=offset, limit=limit, items=list(map(shown, items)))
    return json_model(page)


async def show_entry(request: web.Request) -> web.Response:
    entry = await get_dead_letter(request.app[REDIS], request.match_info["entry_id"])
    if entry is None:
        raise web.HTTPNotFound(text="no such dead-letter entry")
    return json_model(shown(entry))


def shown(entry: DeadLetter) -> DeadLetter:
    """What any key may read: the arguments with secrets redacted, as the dashboard shows
    them. A retry re-enqueues the stored arguments, not these."""
    return entry.model_copy(update={"arguments": redact(entry.arguments)})


async def retry_entry(request: web.Request) -> web.Response:
    """Re-enqueue as a new job (tries start again at 1). Taking the entry out first means two
    concurrent retries cannot both enqueue it; if enqueueing fails the entry is put back."""
    job_id = await actions.retry_dead_letter(request.app[REDIS], request.match_info["entry_id"])
    if job_id is None:
        raise web.HTTPNotFound(text="no such dead-letter entry")
    accepted = JobAccepted(job_id=job_id, status_url=status_url(request, job_id))
    return json_model(accepted, status=202)


async def delete_entry(request: web.Request) -> web.Response:
    if not await remove_dead_letter(request.app[REDIS], request.match_info["entry_id"]):
        raise web.HTTPNotFound(text="no such dead-letter entry")
    return web.Response(status=204)


def add_dead_letter_routes(app: web.Application) -> None:
    entry = f"/dead-letter/{{entry_id:{JOB_ID_PATTERN}}}"
    app.router.add_get("/dead-letter", list_entries)
    app.router.add_get(entry, show_entry)
    app.router.add_post(f"{entry}/retry", retry_entry)
    app.router.add_delete(entry, delete_entry)
