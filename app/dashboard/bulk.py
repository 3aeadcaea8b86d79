"""The dashboard's bulk actions: retry or delete dead letters (the selected ones, or all that
match a filter), abort the selected queued jobs, run a schedule now.

A bulk POST first answers with a confirmation page that says how many entries it will act on
and carries their ids; only that page's "yes" acts, on those ids, and the list page then
shows what happened ("Retried 50, 0 failed"). The session middleware has checked the CSRF
token and the key's right to act before any handler here runs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

from aiohttp import web
from redis.asyncio import Redis

from app.bulkactions import (
    BULK_MAX,
    BulkResult,
    TooMany,
    abort_queued,
    delete_dead_letters,
    retry_dead_letters,
    waiting_jobs,
)
from app.dashboard.session import Form, read_form
from app.dashboard.views import (
    DEAD_LETTERS_SHOWN,
    ID_PATTERN,
    _function_names,
    _redis,
    _settings,
    _url,
    pretty,
    render,
    see_other,
)
from app.redaction import redact
from asyncjobs.keys import HEX_ID_PATTERN
from asyncjobs.quota import NeverFits, QuotaExceeded
from jobs.deadletter import (
    DeadLetterFilter,
    DeadLetterMatches,
    find_dead_letters,
    list_dead_letters,
)
from jobs.schedules import get_schedule, run_now

QUEUED_SHOWN = 200
ACTIONS = ("retry", "delete")
SCOPES = ("selected", "matching")
SUMMARY_FIELDS = ("done", "missing", "failed")
JOB_ID = re.compile(ID_PATTERN)


def _filter_of(values: Mapping[str, object]) -> DeadLetterFilter:
    function, error = values.get("function"), values.get("error")
    return DeadLetterFilter(
        function=function.strip()[:100] if isinstance(function, str) else "",
        error=error.strip()[:200] if isinstance(error, str) else "",
    )


def _ids(form: Form) -> list[str]:
    """The ids the form carries: checkboxes (`id`, repeated) or a confirmation page's one
    field (`ids`, space-separated: a form may have at most 1,000 fields); 400 for one that
    is no job id, 413 past BULK_MAX."""
    ids = [value for value in form.getall("id", []) if isinstance(value, str)]
    packed = form.get("ids")
    if isinstance(packed, str):
        ids += packed.split()
    if any(not JOB_ID.fullmatch(value) for value in ids):
        raise web.HTTPBadRequest(text="not a job id among the ids")
    if len(set(ids)) > BULK_MAX:
        raise web.HTTPRequestEntityTooLarge(
            BULK_MAX, len(set(ids)), text=f"at most {BULK_MAX} entries per request"
        )
    return list(dict.fromkeys(ids))


@dataclass(frozen=True)
class Summary:
    """What the last bulk action did, carried in the list page's query after the redirect."""

    action: str
    done: int
    missing: int
    failed: int

    def text(self) -> str:
        past = {"retry": "Retried", "delete": "Deleted", "abort": "Asked to abort"}[self.action]
        words = [f"{past} {self.done}"]
        if self.action == "retry":
            words.append(f"{self.failed} failed")
        if self.missing:
            gone = "finished or gone" if self.action == "abort" else "retried or deleted"
            words.append(f"{self.missing} already {gone}")
        return ", ".join(words) + "."

    def query(self) -> dict[str, str]:
        return {"did": self.action} | {f: str(getattr(self, f)) for f in SUMMARY_FIELDS}

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> Summary | None:
        action = query.get("did", "")
        if action not in (*ACTIONS, "abort"):
            return None
        counts = [query.get(f, "0") for f in SUMMARY_FIELDS]
        if not all(c.isdigit() and len(c) < 7 for c in counts):
            return None
        done, missing, failed = map(int, counts)
        return cls(action, done, missing, failed)


def _summary(action: str, result: BulkResult) -> Summary:
    return Summary(action, result.done, result.missing, result.failed)


# -- dead letters --


async def dead_letters_page(request: web.Request) -> web.Response:
    """The newest dead letters, or those matching the filter (function, error text)."""
    redis, where = _redis(request), _filter_of(request.query)
    if where:
        found = await find_dead_letters(redis, where, DEAD_LETTERS_SHOWN)
    else:
        total, entries = await list_dead_letters(redis, 0, DEAD_LETTERS_SHOWN)
        found = DeadLetterMatches(matched=total, entries=entries, complete=True)
    summary = Summary.from_query(request.query)
    context = {
        "total": found.matched,
        "complete": found.complete,
        "rows": [(entry, pretty(redact(entry.arguments))) for entry in found.entries],
        "filter": where,
        "functions": _function_names(_settings(request)),
        "bulk_max": BULK_MAX,
        "summary": summary.text() if summary else None,
    }
    return render(request, "dead_letter.html", context)


async def dead_letters_bulk(request: web.Request) -> web.Response:
    """Step 1 (`op`: retry-selected, delete-matching...): the confirmation page. Step 2
    (`confirmed`, with the ids that page listed): act, then back to the list, filtered as it
    was, with what was done."""
    form = await read_form(request)
    where = _filter_of(form)
    if form.get("confirmed") == "1":
        action = form.get("action")
        if action not in ACTIONS:
            raise web.HTTPBadRequest(text="no such action")
        return await _act_on_dead_letters(request, str(action), _ids(form), where)
    action, _, scope = str(form.get("op", "")).partition("-")
    if action not in ACTIONS or scope not in SCOPES:
        raise web.HTTPBadRequest(text="no such bulk action")
    if scope == "selected":
        ids, matched = _ids(form), 0
    else:
        found = await _matching(_redis(request), where)
        ids, matched = [entry.id for entry in found.entries], found.matched
    if not ids:
        raise web.HTTPBadRequest(text=f"Nothing to {action}: select dead letters first.")
    context = {
        "question": f"{action.capitalize()} {_count(len(ids), 'dead letter')}?",
        "detail": _detail(action, len(ids), matched),
        "action_url": _url(request, "dead_letters_bulk"),
        "fields": {"action": action, "function": where.function, "error": where.error},
        "ids": ids,
        "yes": f"Yes, {action} {len(ids)}",
        "danger": action == "delete",
        "back_url": _list_url(request, where, None),
    }
    return render(request, "bulk_confirm.html", context)


async def _matching(redis: Redis, where: DeadLetterFilter) -> DeadLetterMatches:
    return await find_dead_letters(redis, where, BULK_MAX)


def _count(n: int, what: str) -> str:
    return f"{n:,} {what}" + ("" if n == 1 else "s")


def _detail(action: str, n: int, matched: int) -> str:
    more = (
        f" The first {n:,} of the {matched:,} that match: at most {BULK_MAX:,} per request, "
        f"{action} again for the next {min(matched - n, BULK_MAX):,}."
        if matched > n
        else ""
    )
    if action == "retry":
        return "Each is enqueued again as a new job with a fresh try budget." + more
    return "They are forgotten: they cannot be retried afterwards." + more


async def _act_on_dead_letters(
    request: web.Request, action: str, ids: list[str], where: DeadLetterFilter
) -> web.Response:
    redis = _redis(request)
    try:
        if action == "retry":
            result = await retry_dead_letters(redis, ids)
        else:
            result = await delete_dead_letters(redis, ids)
    except TooMany as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    return see_other(_list_url(request, where, _summary(action, result)))


def _list_url(request: web.Request, where: DeadLetterFilter, summary: Summary | None) -> str:
    query = {k: v for k, v in where.model_dump().items() if v}
    if summary is not None:
        query |= summary.query()
    base = _url(request, "dead_letters")
    return f"{base}?{urlencode(query)}" if query else base


# -- queued jobs --


async def queued_page(request: web.Request) -> web.Response:
    """The queue's next jobs (earliest due first) that have not started, to abort in bulk."""
    redis, queue = _redis(request), _settings(request).queue_name
    ids = [i.decode() for i in await redis.zrange(queue, 0, QUEUED_SHOWN - 1)]
    summary = Summary.from_query(request.query)
    context = {
        "jobs": await waiting_jobs(redis, queue, ids),
        "shown": QUEUED_SHOWN,
        "summary": summary.text() if summary else None,
    }
    return render(request, "queued.html", context)


async def queued_abort(request: web.Request) -> web.Response:
    form = await read_form(request)
    ids = _ids(form)
    if not ids:
        raise web.HTTPBadRequest(text="Nothing to abort: select queued jobs first.")
    if form.get("confirmed") != "1":
        context = {
            "question": f"Abort {_count(len(ids), 'job')}?",
            "detail": "Each one still queued or deferred is aborted before it starts; "
            "one that has started or finished since is left alone.",
            "action_url": _url(request, "queued_abort"),
            "fields": {},
            "ids": ids,
            "yes": f"Yes, abort {len(ids)}",
            "danger": True,
            "back_url": _url(request, "queued"),
        }
        return render(request, "bulk_confirm.html", context)
    try:
        result = await abort_queued(_redis(request), _settings(request).queue_name, ids)
    except TooMany as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    query = urlencode(_summary("abort", result).query())
    return see_other(f"{_url(request, 'queued')}?{query}")


# -- schedules --


async def schedule_run(request: web.Request) -> web.Response:
    """Run now, as `POST /schedules/<id>/run` (the button asks for confirmation first)."""
    redis = _redis(request)
    schedule = await get_schedule(redis, request.match_info["schedule_id"])
    if schedule is None:
        raise web.HTTPNotFound(text="No such schedule.")
    try:
        await run_now(redis, _settings(request), schedule)
    except QuotaExceeded as exc:
        retry_after = str(max(1, math.ceil(exc.retry_after)))
        raise web.HTTPTooManyRequests(text=str(exc), headers={"Retry-After": retry_after}) from None
    except (NeverFits, ValueError) as exc:
        raise web.HTTPUnprocessableEntity(text=f"This schedule cannot run: {exc}") from None
    return see_other(_url(request, "cron"))


def add_bulk_routes(app: web.Application) -> None:
    """Paths are relative to /ui, where the dashboard is mounted."""
    app.router.add_get("/dead-letter", dead_letters_page, name="dead_letters")
    app.router.add_post("/dead-letter/bulk", dead_letters_bulk, name="dead_letters_bulk")
    app.router.add_get("/queued", queued_page, name="queued")
    app.router.add_post("/queued/abort", queued_abort, name="queued_abort")
    schedule = f"/schedules/{{schedule_id:{HEX_ID_PATTERN}}}"
    app.router.add_post(f"{schedule}/run", schedule_run, name="schedule_run")
