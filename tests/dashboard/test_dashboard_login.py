"""The dashboard's sign-in form against slow bodies and login CSRF, over real sockets: a body
that trickles in is a 408 within HTTP_BODY_TIMEOUT and counts no failure, and a POST without
the form's CSRF token (a hidden field matching a cookie) is refused before any key is looked at."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from aiohttp import ClientSession, CookieJar
from arq.connections import ArqRedis

from app.dashboard.session import COOKIE_NAME, LOGIN_COOKIE_NAME
from asyncjobs.settings import Settings
from tests.conftest import API_KEY
from tests.dashboard.test_dashboard import csrf_of
from tests.helpers import served

BODY_TIMEOUT_S = 1.0
MAX_FAILURES = 2
TRICKLE_S = 0.25  # each byte well within the timeout; the whole body never
SLOW_POSTS = 5


@pytest.fixture
async def port(make_settings: Callable[..., Settings], redis: ArqRedis) -> AsyncIterator[int]:
    """The app as production serves it, on a loopback port: few failures allowed, for long."""
    settings = make_settings(
        http_body_timeout=BODY_TIMEOUT_S,
        login_max_failures=MAX_FAILURES,
        login_failure_window=3600,
    )
    async with served(settings) as served_port:
        yield served_port


@pytest.fixture
async def browser(port: int) -> AsyncIterator[ClientSession]:
    """A browser-like client: it keeps cookies (of an IP address too) and sends no API key."""
    async with ClientSession(
        base_url=f"http://127.0.0.1:{port}", cookie_jar=CookieJar(unsafe=True)
    ) as session:
        yield session


async def form_token(browser: ClientSession) -> str:
    """GET the form: its hidden CSRF token (the browser keeps the cookie set with it)."""
    async with browser.get("/ui/login") as page:
        assert page.status == 200
        return csrf_of(await page.text())


async def post_login(browser: ClientSession, data: dict[str, str]) -> tuple[int, str]:
    """The status, and where a 303 leads or else the page; a session cookie comes with 303 only."""
    async with browser.post("/ui/login", data=data, allow_redirects=False) as response:
        assert (COOKIE_NAME in response.cookies) == (response.status == 303), response.status
        return response.status, response.headers.get("Location", await response.text())


async def signed_in(browser: ClientSession) -> bool:
    async with browser.get("/ui", allow_redirects=False) as page:
        return page.status == 200


@dataclass
class SlowPost:
    """A POST whose headers promise a body that then comes a byte every TRICKLE_S."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    started: float
    trickle: asyncio.Task[None]


async def open_slow_post(port: int, path: str, cookie: str, body: bytes) -> SlowPost:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: test\r\nCookie: {cookie}\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body[:8]
    )
    await writer.drain()
    return SlowPost(reader, writer, started, asyncio.create_task(_trickle(writer, body[8:])))


async def _trickle(writer: asyncio.StreamWriter, rest: bytes) -> None:
    for byte in rest:
        await asyncio.sleep(TRICKLE_S)  # the client's pace, not a wait for the server
        writer.write(bytes([byte]))
        await writer.drain()


async def answer(post: SlowPost) -> tuple[bytes, bytes, float]:
    """The response's head and body, and how long the head took."""
    try:
        head = await asyncio.wait_for(post.reader.readuntil(b"\r\n\r\n"), BODY_TIMEOUT_S + 10)
        took = time.monotonic() - post.started
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await asyncio.wait_for(post.reader.readexactly(length), 10)
    finally:
        post.trickle.cancel()
        await asyncio.gather(post.trickle, return_exceptions=True)
        post.writer.close()
    return head, body, took


def slow_login_body(token: str) -> tuple[str, bytes]:
    """A wrong key with the right CSRF token: were it ever read, it would count a failure."""
    return f"{LOGIN_COOKIE_NAME}={token}", f"csrf={token}&key={'wrong-key-' * 8}".encode()


async def test_a_login_body_that_trickles_in_is_a_408_within_the_timeout(
    port: int, browser: ClientSession
) -> None:
    post = await open_slow_post(port, "/ui/login", *slow_login_body(await form_token(browser)))
    head, body, took = await answer(post)
    assert head.startswith(b"HTTP/1.1 408"), head
    assert f"did not arrive within {BODY_TIMEOUT_S:g} s".encode() in body
    assert COOKIE_NAME.encode() not in head
    assert BODY_TIMEOUT_S * 0.9 <= took < BODY_TIMEOUT_S + 5, took


async def test_slow_login_posts_count_no_failure_and_lock_no_one_out(
    port: int, browser: ClientSession
) -> None:
    """Five slow posts from this address (2 failures allowed): meanwhile and afterwards the
    right key signs in, and a wrong key is still the first failure (401, not 429)."""
    token = await form_token(browser)
    posts = [
        await open_slow_post(port, "/ui/login", *slow_login_body(token)) for _ in range(SLOW_POSTS)
    ]
    assert await post_login(browser, {"key": API_KEY, "csrf": token}) == (303, "/ui")
    signed_in_at = time.monotonic()

    for post, (head, _, took) in zip(
        posts, await asyncio.gather(*(answer(post) for post in posts)), strict=True
    ):
        assert head.startswith(b"HTTP/1.1 408"), head
        assert took < BODY_TIMEOUT_S + 5, took
        assert signed_in_at < post.started + took, "signed in only once the slow posts ended"
    assert (await post_login(browser, {"key": "wrong", "csrf": token}))[0] == 401
    assert await post_login(browser, {"key": API_KEY, "csrf": token}) == (303, "/ui")


async def test_a_slow_body_on_a_dashboard_action_is_a_408(
    port: int, browser: ClientSession
) -> None:
    """Signed-in forms are read under the same timeout: the session survives the slow post."""
    right = {"key": API_KEY, "csrf": await form_token(browser)}
    assert await post_login(browser, right) == (303, "/ui")
    session_id = next(c.value for c in browser.cookie_jar if c.key == COOKIE_NAME)
    body = b"csrf=" + b"x" * 60
    post = await open_slow_post(port, "/ui/logout", f"{COOKIE_NAME}={session_id}", body)
    head, _, took = await answer(post)
    assert head.startswith(b"HTTP/1.1 408"), head
    assert BODY_TIMEOUT_S * 0.9 <= took < BODY_TIMEOUT_S + 5, took
    assert await signed_in(browser)


async def test_a_login_without_the_forms_token_is_refused_and_not_counted(
    browser: ClientSession,
) -> None:
    """No cookie, no field, a wrong field, another token: 403, the form again with an error, no
    session; more refusals than failures allowed, yet the right key then signs in."""
    for data in [{"key": API_KEY}, {"key": API_KEY, "csrf": ""}]:
        browser.cookie_jar.clear()  # never on the form: no cookie
        status, page = await post_login(browser, data)
        assert status == 403, data
        assert "did not come from this site" in page and 'name="key"' in page
    token = await form_token(browser)  # a cookie now, with the token it must match
    other = "A" * len(token)
    for data in [{"key": API_KEY}, {"key": API_KEY, "csrf": token[:-1] + "x"},
                 {"key": API_KEY, "csrf": other}, {"key": API_KEY, "token": token}]:  # fmt: skip
        assert (await post_login(browser, data))[0] == 403, data
    assert not await signed_in(browser)

    browser.cookie_jar.clear()  # the right field alone, without its cookie: refused too
    assert (await post_login(browser, {"key": API_KEY, "csrf": token}))[0] == 403
    right = {"key": API_KEY, "csrf": await form_token(browser)}
    assert await post_login(browser, right) == (303, "/ui")
    assert await signed_in(browser)


async def test_the_forms_token_signs_in_as_a_browser_does(browser: ClientSession) -> None:
    async with browser.get("/ui") as page:  # no session: redirected to the form
        assert page.url.path == "/ui/login"
        token = csrf_of(await page.text())
        cookie = page.cookies[LOGIN_COOKIE_NAME]
    assert cookie.value == token
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/ui/login"
    assert await form_token(browser) == token  # a second tab's form: the same token, both work

    assert await post_login(browser, {"key": API_KEY, "csrf": token}) == (303, "/ui")
    assert await signed_in(browser)


async def test_a_refused_form_carries_a_token_that_works(browser: ClientSession) -> None:
    """A stale form's 403 page sets a fresh cookie and field: submitting it again signs in."""
    async with browser.post("/ui/login", data={"key": API_KEY, "csrf": "stale"}) as refused:
        assert refused.status == 403
        token = csrf_of(await refused.text())
    assert await post_login(browser, {"key": API_KEY, "csrf": token}) == (303, "/ui")
