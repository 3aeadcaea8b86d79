"""`Idempotency-Key` for enqueue endpoints: the same key returns the same answer, once enqueued.

The first request with a key claims it in Redis (SET NX) with a fingerprint of the request; when
its handler succeeds, the response is stored under the key for `idempotency_ttl` seconds. A repeat
with the same request gets the stored response (header `Idempotent-Replayed: true`), a repeat
with a different request gets 422, a repeat while the first is still running gets 409.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from app.auth import PRINCIPAL
from app.state import REDIS, SETTINGS
from asyncjobs.keys import IDEMPOTENCY_KEY_PREFIX

MAX_KEY_LENGTH = 255

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
        pending = json.dumps({"fingerprint": fingerprint, "state": "pending"})
        if not await redis.set(redis_key, pending, nx=True, ex=ttl):
            return await replay(redis_key, fingerprint, await redis.get(redis_key))
        try:
            response = await handler(request)
        except BaseException:
            await redis.delete(redis_key)  # nothing was enqueued: the key may be used again
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
