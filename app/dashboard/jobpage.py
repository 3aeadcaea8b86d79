"""The job page's parts beyond its live fields: the tries, and the arguments and result as
folded JSON with their long lists paged. The page re-fetches the tries and the result as HTML
fragments when its event stream says they changed (the status, the try count, the result's
digest), so they are rendered here once, escaped, for the page and for the fragments."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from arq.connections import ArqRedis
from redis.asyncio import Redis

from app.dashboard.folded import PAGE_PARAM, Node, fold, json_safe, page_numbers
from app.jobstatus import read_job_with_progress
from app.redaction import redact
from app.schemas import JobView
from app.state import REDIS, SETTINGS
from asyncjobs.jobstate import JobState
from asyncjobs.keys import TRIES_KEY_PREFIX


@dataclass(frozen=True)
class TryInfo:
    number: int
    started_at: datetime | None
    ended_at: datetime | None
    worker: str
    outcome: str
    error: str

    @property
    def duration(self) -> str:
        if self.started_at is None or self.ended_at is None:
            return ""
        seconds = (self.ended_at - self.started_at).total_seconds()
        return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _moment(ms: object) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, UTC) if isinstance(ms, int | float) and ms else None


def _try_of(raw: bytes) -> TryInfo | None:
    try:
        entry = json.loads(raw)
        return TryInfo(
            number=int(entry.get("try", 0)),
            started_at=_moment(entry.get("started_at")),
            ended_at=_moment(entry.get("ended_at")),
            worker=str(entry.get("worker") or ""),
            outcome=str(entry.get("outcome") or ""),
            error=str(entry.get("error") or ""),
        )
    except (ValueError, TypeError, AttributeError):  # a damaged entry: left out, not a 500
        return None


async def read_tries(redis: Redis, view: JobView) -> list[TryInfo]:
    """The job's tries, oldest first (the worker keeps the last 50: jobs/engine/runner.py).
    A job that completed at its first try has no list: its result tells that try."""
    raw = await redis.lrange(TRIES_KEY_PREFIX + view.job_id, 0, -1)  # type: ignore[misc]
    tries = [t for t in (_try_of(as_bytes) for as_bytes in raw) if t is not None]
    if not tries and view.status == JobState.COMPLETE and (view.tries or 1) == 1:
        return [TryInfo(1, view.start_time, view.finish_time, "", JobState.COMPLETE, "")]
    return tries


def shown_result(result: Any) -> Any:
    """A job's result as the page shows it: JSON, secrets redacted."""
    return None if result is None else redact(json_safe(result))


def result_digest(result: Any) -> str:
    """Changes when the shown result does: the event stream sends this, not the result."""
    if result is None:
        return ""
    text = json.dumps(shown_result(result), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def folded(request: web.Request, value: Any, root: str) -> Node | None:
    """`value` folded, each long list on the page its `page.<path>` parameter asks for."""
    if value is None:
        return None

    def href(path: str, number: int) -> str:
        query = request.rel_url.query.copy()
        query[PAGE_PARAM + path] = str(number)
        return str(request.rel_url.with_query(query).with_fragment("f-" + path))

    return fold(value, root, page_numbers(request.rel_url.query), href)


# -- the fragments the page re-fetches --


def _job_id(request: web.Request) -> str:
    return request.match_info["job_id"]


async def tries_fragment(request: web.Request) -> web.Response:
    redis: ArqRedis = request.config_dict[REDIS]
    queue_name = request.config_dict[SETTINGS].queue_name
    tries = await read_tries(
        redis, await read_job_with_progress(redis, queue_name, _job_id(request))
    )
    return aiohttp_jinja2.render_template("_tries.html", request, {"tries": tries})


async def result_fragment(request: web.Request) -> web.Response:
    redis: ArqRedis = request.config_dict[REDIS]
    queue_name = request.config_dict[SETTINGS].queue_name
    view = await read_job_with_progress(redis, queue_name, _job_id(request))
    node = folded(request, shown_result(view.result), "result")
    return aiohttp_jinja2.render_template("_folded.html", request, {"node": node})


def add_job_page_routes(app: web.Application, job: str) -> None:
    """`job`: the job id's route pattern, as views.py names it."""
    app.router.add_get(f"/jobs/{job}/tries", tries_fragment, name="job_tries")
    app.router.add_get(f"/jobs/{job}/result", result_fragment, name="job_result")
