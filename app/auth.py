"""API keys (Bearer), and what a key is charged: the per-key rate limit on requests that change
something, and the hourly message quota (asyncjobs/quota.py).

Keys are kept only as SHA-256 digests and compared in constant time; a key is identified in
logs, rate-limit counters and idempotency records by a short prefix of its digest, never itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

from aiohttp import web

from app.errors import Handler
from app.state import REDIS, SETTINGS
from asyncjobs.quota import NeverFits, QuotaExceeded, Window, message_quota
from asyncjobs.settings import Settings

PUBLIC_ROUTES = frozenset(
    {("GET", "/health"), ("HEAD", "/health"), ("GET", "/openapi.json"), ("HEAD", "/openapi.json"),
     ("GET", "/favicon.ico"), ("HEAD", "/favicon.ico")}
)  # fmt: skip
# The operator dashboard (app/dashboard) checks its own session cookie and CSRF tokens instead.
PUBLIC_PREFIXES = ("/ui",)
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class Principal:
    key_id: str
    read_only: bool


PRINCIPAL = web.RequestKey("principal", Principal)  # who made the request


class KeyRing:
    def __init__(self, settings: Settings) -> None:
        self._keys = [(_digest(k.get_secret_value()), False) for k in settings.api_keys]
        self._keys += [(_digest(k.get_secret_value()), True) for k in settings.api_read_keys]

    def __bool__(self) -> bool:
        return bool(self._keys)

    def identify(self, presented: str) -> Principal | None:
        digest = _digest(presented)
        found: Principal | None = None
        for stored, read_only in self._keys:  # no early exit: the time says nothing
            if hmac.compare_digest(stored, digest):
                found = Principal(key_id=digest.hex()[:12], read_only=read_only)
        return found

    def still_valid(self, principal: Principal) -> bool:
        """Whether a principal identified earlier (a dashboard session) still has its key."""
        return any(
            Principal(key_id=stored.hex()[:12], read_only=read_only) == principal
            for stored, read_only in self._keys
        )


KEYRING = web.AppKey("keyring", KeyRing)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@web.middleware
async def require_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    if (request.method, request.path) in PUBLIC_ROUTES or _under_public_prefix(request.path):
        return await handler(request)
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    principal = request.app[KEYRING].identify(presented.strip()) if scheme == "Bearer" else None
    if principal is None:
        raise web.HTTPUnauthorized(
            text="send a valid API key: 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": 'Bearer realm="asyncjobs"'},
        )
    if principal.read_only and request.method not in READ_METHODS:
        raise web.HTTPForbidden(text="this API key is read-only")
    request[PRINCIPAL] = principal
    return await handler(request)


def _under_public_prefix(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in PUBLIC_PREFIXES)


@web.middleware
async def rate_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Fixed window per key: every request that changes something (enqueues, aborts, retries,
    sources) counts against `rate_limit_requests` per `rate_limit_window`."""
    principal: Principal | None = request.get(PRINCIPAL)
    if principal is not None and request.method not in READ_METHODS:
        await charge(request, principal.key_id)
    return await handler(request)


async def charge(
    request: web.Request, key_id: str, weight: int = 1, refund_if_refused: bool = False
) -> None:
    """Count `weight` against the key's window: 429 past the limit when the next window can
    hold it, 422 when no window can. A request is charged 1 on arrival; an enqueue then
    charges the pages it asks for beyond that (URLs), and its messages to `charge_messages`."""
    settings = request.config_dict[SETTINGS]
    limit, seconds = settings.rate_limit_requests, settings.rate_limit_window
    check_fits(settings, weight)
    window = Window(key_id, seconds)
    now = time.time()
    redis = request.config_dict[REDIS]
    if await window.add(redis, now, weight) > limit:
        if refund_if_refused:  # nothing will be done for it
            await window.give_back(redis, now, weight)
        raise web.HTTPTooManyRequests(
            text=f"rate limit of {limit} requests per {seconds:g}s reached",
            headers={"Retry-After": str(window.retry_after(now))},
        )


def check_fits(settings: Settings, weight: int) -> None:
    """422 for a request whose weight exceeds the whole rate limit: no window can hold it."""
    limit, seconds = settings.rate_limit_requests, settings.rate_limit_window
    if weight > limit:
        raise web.HTTPUnprocessableEntity(
            text=f"this request counts {weight} against a rate limit of {limit} per "
            f"{seconds:g}s (RATE_LIMIT_REQUESTS): it never fits; send fewer at a time"
        )


async def charge_more(request: web.Request, weight: int) -> None:
    """The rest of an enqueue's weight (its first unit was charged on arrival): 422 when the
    whole weight, that unit included, never fits."""
    principal: Principal | None = request.get(PRINCIPAL)
    if principal is not None:
        check_fits(request.config_dict[SETTINGS], weight)
    if principal is not None and weight > 1:
        await charge(request, principal.key_id, weight - 1, refund_if_refused=True)


async def charge_extra(request: web.Request, weight: int) -> None:
    """Charge `weight` more (jobs a request writes beside the one it asked for: `then`
    follow-ups, a batch's callback), refunded if refused."""
    principal: Principal | None = request.get(PRINCIPAL)
    if principal is not None and weight > 0:
        await charge(request, principal.key_id, weight, refund_if_refused=True)


async def charge_messages(request: web.Request, messages: int) -> None:
    """Charge an email's or a newsletter's messages to the key's hourly quota: 422 when they
    exceed the whole quota, 429 with the true wait when they fit later."""
    principal: Principal | None = request.get(PRINCIPAL)
    if principal is None:
        return
    with quota_refusals():
        await message_quota(request.config_dict[SETTINGS]).take(
            request.config_dict[REDIS], principal.key_id, messages
        )


@contextlib.contextmanager
def quota_refusals() -> Iterator[None]:
    """A quota's refusals as the API answers them: 422 when the request can never fit, 429
    with the true Retry-After when it fits later."""
    try:
        yield
    except NeverFits as exc:
        raise web.HTTPUnprocessableEntity(text=str(exc)) from None
    except QuotaExceeded as exc:
        raise web.HTTPTooManyRequests(
            text=str(exc), headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        ) from None
