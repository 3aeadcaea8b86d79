"""Dashboard sessions and CSRF tokens.

An operator types an API key into /ui/login once; the dashboard then keeps a random session id
in Redis (`asyncjobs:session:<id>`, 12 hours) and in a cookie the browser sends only to /ui.
Every POST form carries the session's CSRF token; read-only keys may look but not act.
The login form, before any session exists, carries a token of its own: the same random value
in a cookie and in a hidden field (double submit), so another site cannot sign a browser in.
Every form body is read within HTTP_BODY_TIMEOUT, as the API reads its JSON bodies.
"""

from __future__ import annotations

import hmac
import re
import secrets
from dataclasses import dataclass

from aiohttp import web
from multidict import MultiDictProxy
from redis.asyncio import Redis

from app.auth import KEYRING, Principal, charge
from app.errors import Handler
from app.http import within_body_timeout
from app.state import REDIS
from asyncjobs.keys import SESSION_KEY_PREFIX

SESSION_TTL_S = 12 * 3600
COOKIE_NAME = "asyncjobs_session"
LOGIN_COOKIE_NAME = "asyncjobs_login"  # the login form's CSRF token, before any session
COOKIE_PATH = "/ui"
LOGIN_PATH = "/ui/login"
LOGOUT_PATH = "/ui/logout"
STATIC_PREFIX = "/ui/static/"
CSRF_FIELD = "csrf"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")  # what secrets.token_urlsafe(32) makes

Form = MultiDictProxy[str | bytes | bytearray | web.FileField]


@dataclass(frozen=True)
class Session:
    id: str
    key_id: str
    read_only: bool
    csrf: str

    @property
    def principal(self) -> Principal:
        return Principal(key_id=self.key_id, read_only=self.read_only)


SESSION = web.RequestKey("dashboard_session", Session)


async def create_session(redis: Redis, principal: Principal) -> Session:
    session = Session(
        id=secrets.token_urlsafe(32),
        key_id=principal.key_id,
        read_only=principal.read_only,
        csrf=secrets.token_urlsafe(32),
    )
    fields = {"key_id": session.key_id, "read_only": int(session.read_only), "csrf": session.csrf}
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(SESSION_KEY_PREFIX + session.id, mapping=fields)
        pipe.expire(SESSION_KEY_PREFIX + session.id, SESSION_TTL_S)
        await pipe.execute()
    return session


async def load_session(request: web.Request) -> Session | None:
    session_id = request.cookies.get(COOKIE_NAME, "")
    if not _TOKEN.fullmatch(session_id):  # not worth a Redis round trip
        return None
    redis = request.config_dict[REDIS]
    fields = await redis.hgetall(SESSION_KEY_PREFIX + session_id)  # type: ignore[misc]
    if not fields:
        return None
    text = {k.decode(): v.decode() for k, v in fields.items()}
    session = Session(
        id=session_id,
        key_id=text["key_id"],
        read_only=text["read_only"] == "1",
        csrf=text["csrf"],
    )
    # A key taken out of API_KEYS / API_READ_KEYS ends its sessions at once, not 12 h later.
    return session if request.config_dict[KEYRING].still_valid(session.principal) else None


async def delete_session(redis: Redis, session: Session) -> None:
    await redis.delete(SESSION_KEY_PREFIX + session.id)


def is_https(request: web.Request) -> bool:
    """HTTPS to us, or to a TLS-terminating proxy in front of us. Trusting the proxy headers
    is safe here: they can only add the cookie's Secure flag, never take it away."""
    if request.secure:
        return True
    forwarded_proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0]
    if forwarded_proto.strip().lower() == "https":
        return True
    return any(hop.get("proto", "").lower() == "https" for hop in request.forwarded)


def set_session_cookie(
    response: web.StreamResponse, request: web.Request, session: Session
) -> None:
    response.set_cookie(
        COOKIE_NAME,
        session.id,
        path=COOKIE_PATH,
        max_age=SESSION_TTL_S,
        httponly=True,
        samesite="Strict",
        secure=is_https(request),
    )


def clear_session_cookie(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE_NAME, path=COOKIE_PATH)


async def read_form(request: web.Request) -> Form:
    """The form body within HTTP_BODY_TIMEOUT, else 408 (no sign-in failure counted)."""
    return await within_body_timeout(request, request.post())


def same_token(given: object, expected: str) -> bool:
    """In constant time: how long a wrong guess takes tells nothing about the right one."""
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


def login_token(request: web.Request) -> str:
    """The browser's login CSRF token if it has one (so two tabs on the form both work), else
    a new one."""
    token = request.cookies.get(LOGIN_COOKIE_NAME, "")
    return token if _TOKEN.fullmatch(token) else secrets.token_urlsafe(32)


def set_login_cookie(response: web.StreamResponse, request: web.Request, token: str) -> None:
    # A browser session cookie: a form left open for hours still signs in.
    response.set_cookie(
        LOGIN_COOKIE_NAME,
        token,
        path=LOGIN_PATH,
        httponly=True,
        samesite="Strict",
        secure=is_https(request),
    )


def login_token_ok(request: web.Request, form: Form) -> bool:
    """Double submit: the hidden field must match the cookie sent with the form. Another site
    can make a browser POST here (login CSRF: signing the victim in with the attacker's key)
    but cannot read that cookie, nor set it short of owning a sibling host."""
    cookie = request.cookies.get(LOGIN_COOKIE_NAME, "")
    return bool(_TOKEN.fullmatch(cookie)) and same_token(form.get(CSRF_FIELD), cookie)


def _is_open(request: web.Request) -> bool:
    return request.path == LOGIN_PATH or request.path.startswith(STATIC_PREFIX)


@web.middleware
async def require_session(request: web.Request, handler: Handler) -> web.StreamResponse:
    """No session: to the login page. POST: the right CSRF token, and a key that may act."""
    if _is_open(request):
        return await handler(request)
    session = await load_session(request)
    if session is None:
        raise web.HTTPSeeOther(LOGIN_PATH)
    if request.method not in ("GET", "HEAD"):
        form = await read_form(request)
        if not same_token(form.get(CSRF_FIELD), session.csrf):
            raise web.HTTPForbidden(text="missing or wrong CSRF token: reload the page, try again")
        if session.read_only and request.path != LOGOUT_PATH:
            raise web.HTTPForbidden(text="this API key is read-only")
        if request.path != LOGOUT_PATH:  # the key's rate limit, as through the API
            await charge(request, session.key_id)
    request[SESSION] = session
    return await handler(request)
