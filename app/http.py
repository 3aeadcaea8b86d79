"""Helpers every handler uses: JSON bodies in, pydantic models out, bounded query parameters."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

import jobs.builtins  # noqa: F401  (registers every built-in job: JOB_ID_PATTERN reads them)
from app import actions
from app.auth import PRINCIPAL, charge_extra, charge_messages
from app.chains import cost_of
from app.idempotency import new_job_id
from app.state import CPU, REDIS, SETTINGS
from asyncjobs.registry import job_types
from jobs.cpulimit import CpuLimitExceeded
from jobs.engine.dependencies import DEPENDENCIES_KWARG, Dependencies
from jobs.engine.queue import OWNER_KWARG
from jobs.engine.unique import ExistingJob, Unique, holder_of

T = TypeVar("T")

ANY_JOB_ID_PATTERN = r"[A-Za-z0-9_.:-]{1,128}"  # any arq job id (a dead letter's is its job's)
JOB_TYPES_SEGMENT = "types"  # GET /jobs/types, beside /jobs/{job_id}


def _fixed_job_paths() -> list[str]:
    """The segments after /jobs/ that name no job: each built-in's endpoint (from the
    registry: POST /jobs/email, ...) and /jobs/types."""
    endpoints = {t.public_name for t in job_types() if t.builtin and t.public_name}
    return [*sorted(endpoints), JOB_TYPES_SEGMENT]


# Any arq job id, but not the names of the fixed endpoints beside it (/jobs/email is no job).
JOB_ID_PATTERN = rf"(?!(?:{'|'.join(map(re.escape, _fixed_job_paths()))})$){ANY_JOB_ID_PATTERN}"


def json_model(model: BaseModel, status: int = 200) -> web.Response:
    # pydantic's own serializer (Rust): no dict built in between, no second encoder
    return web.Response(
        text=model.model_dump_json(), status=status, content_type="application/json"
    )


async def within_body_timeout(request: web.Request, reading: Awaitable[T]) -> T:
    """`reading` (of the request's body) within HTTP_BODY_TIMEOUT, else 408: a client that
    trickles its body holds its own connection that long, and nothing else."""
    timeout = request.config_dict[SETTINGS].http_body_timeout
    try:
        async with asyncio.timeout(timeout):
            return await reading
    except TimeoutError:
        raise web.HTTPRequestTimeout(
            text=f"the request body did not arrive within {timeout:g} s"
        ) from None


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; 400 for empty or malformed JSON, 413 (by aiohttp) if too big."""
    raw = await within_body_timeout(request, request.read())
    if not raw.strip():
        raise web.HTTPBadRequest(text="request body is empty: send a JSON object")
    try:
        data = json.loads(raw)
    except RecursionError as exc:  # "[[[[..." deeper than the parser's own recursion limit
        raise web.HTTPBadRequest(text=_TOO_DEEP) from exc
    except (UnicodeDecodeError, ValueError) as exc:  # ValueError: also a 5,000-digit number
        raise web.HTTPBadRequest(text=f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise web.HTTPUnprocessableEntity(text="request body must be a JSON object")
    if _depth_exceeds(data, MAX_JSON_DEPTH):
        raise web.HTTPBadRequest(text=_TOO_DEEP)
    return data


MAX_JSON_DEPTH = 32  # no request body of this API nests more than a few levels
_TOO_DEEP = f"request body nests deeper than {MAX_JSON_DEPTH} levels"


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether `value` nests lists and objects more than `limit` deep (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        for child in children:
            if isinstance(child, dict | list):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def query_int(request: web.Request, name: str, *, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    # ASCII digits only: str.isdigit() is also true of "²", which int() refuses
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18) or not lo <= int(raw) <= hi:
        raise web.HTTPBadRequest(text=f"query parameter {name!r} must be an integer {lo}..{hi}")
    return int(raw)


def found(value: T | None, what: str) -> T:
    """`value`, or a 404 saying there is no such `what`."""
    if value is None:
        raise web.HTTPNotFound(text=f"no such {what}")
    return value


def status_url(request: web.Request, job_id: str) -> str:
    return str(request.app.router["job_status"].url_for(job_id=job_id))


def owner_of(request: web.Request) -> str:
    """The id of the API key the request came with ("" without one): whom its jobs and its
    CPU pool calls belong to."""
    principal = request.get(PRINCIPAL)
    return principal.key_id if principal is not None else ""


async def off_loop(request: web.Request, what: str, function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` in the API's CPU pool, in the caller's turn: work whose cost the
    caller's input decides (a newsletter's templates and addresses) never stalls the event
    loop. Past CPU_LIMIT_SECONDS or CPU_MEMORY_LIMIT_MB: 422, the input is too costly."""
    try:
        return await request.app[CPU].run(what, function, *args, owner=owner_of(request))
    except CpuLimitExceeded as exc:
        raise web.HTTPUnprocessableEntity(text=str(exc)) from None


async def enqueue(request: web.Request, function: str, /, **kwargs: Any) -> str:
    """`app.actions.enqueue` with the app's Redis; the new job's id. With REDIS_WAIT_REPLICAS,
    only once replicas have the job (else 503: see app/errors.py). With an Idempotency-Key, the
    job's id is derived from it (unless the handler chose one, derived too) and an existing job
    of that id is this request's own, from an earlier try: its id is the answer."""
    settings = request.app[SETTINGS]
    await charge_follow_ups(request, kwargs.get(DEPENDENCIES_KWARG))
    keyed = "Idempotency-Key" in request.headers
    if keyed:
        kwargs.setdefault("_job_id", new_job_id(request))
    if owner := owner_of(request):
        kwargs[OWNER_KWARG] = owner
    return await actions.enqueue(
        request.app[REDIS], function, _replicated=settings, _existing_ok=keyed, **kwargs
    )


async def unique_holder(
    request: web.Request, function: str, unique: Unique | None, own_id: str | None = None
) -> ExistingJob | None:
    """The job holding the request's unique key now (none: None), read before the request's
    quota is charged, so that answering the job already there charges nothing more than the
    request itself. Requests at the same moment may all find it free (and each be charged):
    the enqueue script decides which one enqueues. `own_id`: the job this request enqueues
    under an Idempotency-Key, which is its own earlier try's, not another's."""
    if unique is None:
        return None
    holder = await holder_of(request.app[REDIS], unique, function, owner_of(request))
    return None if holder == own_id else holder


async def enqueue_many(
    request: web.Request, function: str, calls: list[dict[str, Any]]
) -> list[str]:
    """`app.actions.enqueue_many` with the app's Redis; the new jobs' ids (derived from an
    Idempotency-Key as `enqueue`'s are, one per call)."""
    settings = request.app[SETTINGS]
    keyed = "Idempotency-Key" in request.headers
    if keyed:
        base = new_job_id(request)
        calls = [{"_job_id": f"{base}-{n}"} | call for n, call in enumerate(calls)]
    if owner := owner_of(request):
        calls = [call | {OWNER_KWARG: owner} for call in calls]
    return await actions.enqueue_many(
        request.app[REDIS], function, calls, settings, existing_ok=keyed
    )


async def charge_follow_ups(request: web.Request, deps: Dependencies | None) -> None:
    """Charge a request's `then` follow-ups when they are written (with their parent): each
    job's units to the rate limit, an email's messages to the hourly quota, as if each had
    been its own request."""
    units, messages = cost_of(deps.then if deps is not None else None)
    await charge_extra(request, units)
    if messages:
        await charge_messages(request, messages)
