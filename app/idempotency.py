"""`Idempotency-Key` for enqueue endpoints: the same key returns the same answer, once enqueued.

What a request enqueues is known by ids derived from its key (`new_job_id`: the job, a
newsletter, an export, an email's Message-ID), so the job itself records the key, in the same
script that enqueues it: a retry finds the job the first try enqueued, whatever that try's
answer was (a 503 while Redis fails over, a dropped connection), instead of adding a second.

The first request with a key claims it in Redis (SET NX) with a fingerprint of the request;
when its handler succeeds, the response is stored under the key for `idempotency_ttl` seconds.
A repeat with the same request gets the stored response (header `Idempotent-Replayed: true`),
a repeat with a different request gets 422, a repeat while the first is still running gets
409. A first try refused with a 4xx frees the key; one that failed otherwise (outcome unknown)
keeps it, marked `unknown`, and a repeat runs the handler again: it finds the same job.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from app.auth import PRINCIPAL
from app.state import REDIS, SETTINGS
from asyncjobs.keys import IDEMPOTENCY_KEY_PREFIX
from asyncjobs.luascript import LuaScript

MAX_KEY_LENGTH = 255
# A claim whose request never finished (its web process died, or Redis stalled so long that the
# try could not mark its outcome unknown) frees the key after this: longer than a request may
# take (a 10 s body, a few 2 s Redis calls); a retry sooner gets 409. Two tries at once could
# only name the same ids, so the bound is about answers, not duplicates.
PENDING_TTL_S = 30

_TAKE_OVER = LuaScript("app", "idempotency_take_over")

Handler = Callable[[web.Request], Awaitable[web.Response]]


def idempotent(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.Response:
        key = request.headers.get("Idempotency-Key")
        if key is None:
            return await handler(request)
        if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
            raise web.HTTPBadRequest(
                text="Idempotency-Key must be 1 to 255 printable ASCII characters"
            )
        redis = request.app[REDIS]
        ttl = int(request.app[SETTINGS].idempotency_ttl)
        redis_key = IDEMPOTENCY_KEY_PREFIX + scoped_key(request, key)
        fingerprint = await request_fingerprint(request)
        if not await claim(redis, redis_key, fingerprint):
            return await replay(redis_key, fingerprint, await redis.get(redis_key))
        try:
            response = await handler(request)
        except BaseException as exc:
            if refused(exc):  # before anything was enqueued: the key is free
                await redis.delete(redis_key)
            else:
                await mark_unknown(redis, redis_key, fingerprint, ttl)
            raise
        if 200 <= response.status < 300 and isinstance(response.body, bytes):
            stored = {
                "fingerprint": fingerprint,
                "state": "done",
                "status": response.status,
                "body": json.loads(response.body),
            }
            await redis.set(redis_key, json.dumps(stored), ex=ttl)
        else:
            await redis.delete(redis_key)
        return response

    return wrapped


def refused(exc: BaseException) -> bool:
    """A 4xx: the request was refused as it stood (invalid, over a limit), nothing enqueued."""
    if isinstance(exc, ValidationError):
        return True
    return isinstance(exc, web.HTTPException) and exc.status < 500


async def claim(redis: Redis, redis_key: str, fingerprint: str) -> bool:
    """Take the key for this request: free, or left `unknown` by an earlier try of it."""
    pending = json.dumps({"fingerprint": fingerprint, "state": "pending"})
    if await redis.set(redis_key, pending, nx=True, ex=PENDING_TTL_S):
        return True
    raw = await redis.get(redis_key)
    if raw is None or json.loads(raw).get("fingerprint") != fingerprint:
        return False  # replay() answers: gone meanwhile (409) or another request (422)
    return await take_over(redis, redis_key, state="unknown", record=pending, ttl_s=PENDING_TTL_S)


async def take_over(redis: Redis, redis_key: str, *, state: str, record: str, ttl_s: int) -> bool:
    """Replace the record at `redis_key` with `record` (for `ttl_s`) if it is still in `state`."""
    return bool(await _TAKE_OVER.run(redis, [redis_key], [state, record, ttl_s]))


async def mark_unknown(redis: Redis, redis_key: str, fingerprint: str, ttl: int) -> None:
    """The request failed after it may have enqueued: keep the key, so that a retry runs the
    handler again and finds the job by its derived id. Best effort: Redis may be the failure,
    and then the pending claim expires after PENDING_TTL_S instead."""
    record = json.dumps({"fingerprint": fingerprint, "state": "unknown"})
    with contextlib.suppress(RedisError, OSError):
        await redis.set(redis_key, record, ex=ttl)


def new_job_id(request: web.Request) -> str:
    """A new job's id (32 hex): derived from the request's Idempotency-Key (scoped to the API
    key and the path) when it has one, so that every try of the request names the same job;
    random otherwise."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return uuid.uuid4().hex
    return hashlib.sha256(f"{scoped_key(request, key)}:{request.path}".encode()).hexdigest()[:32]


def scoped_key(request: web.Request, key: str) -> str:
    """An Idempotency-Key scoped to the caller, as a digest: two API keys may pick the same
    Idempotency-Key independently."""
    principal = request.get(PRINCIPAL)
    scope = f"{principal.key_id if principal else '-'}:{key}"
    return hashlib.sha256(scope.encode()).hexdigest()


async def request_fingerprint(request: web.Request) -> str:
    raw = await request.read()
    try:  # the same JSON, however it is spaced or ordered, is the same request
        canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")).encode()
    except (ValueError, UnicodeDecodeError):
        canonical = raw
    return hashlib.sha256(request.method.encode() + request.path.encode() + canonical).hexdigest()


async def replay(redis_key: str, fingerprint: str, raw: bytes | None) -> web.Response:
    stored: dict[str, Any] = json.loads(raw) if raw else {}
    if stored.get("fingerprint") != fingerprint:
        raise web.HTTPUnprocessableEntity(
            text="this Idempotency-Key was already used with a different request"
        )
    if stored.get("state") != "done":
        raise web.HTTPConflict(text="a request with this Idempotency-Key is still being processed")
    return web.json_response(
        stored["body"], status=stored["status"], headers={"Idempotent-Replayed": "true"}
    )
