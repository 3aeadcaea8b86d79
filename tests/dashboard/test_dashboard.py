"""The operator dashboard over plain HTTP: sessions, CSRF, read-only keys, real data, escaping."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, CookieJar
from aiohttp.test_utils import TestClient, TestServer
from arq.connections import ArqRedis
from arq.worker import Worker
from selectolax.lexbor import LexborHTMLParser

from app.dashboard.session import SESSION_TTL_S
from app.web import create_app
from asyncjobs.arqcompat import abort_jobs_ss
from asyncjobs.keys import SESSION_KEY_PREFIX, source_docs_key, source_failures_key
from asyncjobs.settings import Settings
from jobs.deadletter import get_dead_letter
from tests.conftest import API_KEY, READ_KEY
from tests.helpers import ApiClient, start_of_a_window, wait_for, window_number
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler

EMAIL = {"to": "a@example.com", "subject": "Hello", "text": "Hi"}
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
PAGES = ["/ui", "/ui/jobs", "/ui/jobs/rows", "/ui/dead-letter", "/ui/cron", "/ui/sources"]


@pytest.fixture
def settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Settings:
    return make_settings(exports_dir=tmp_path / "exports", mail_sink_dir=tmp_path / "mail")


@pytest.fixture
async def ui(settings: Settings, redis: ArqRedis) -> AsyncIterator[ApiClient]:
    """A browser-like client of the app: cookies, and no Authorization header."""
    async with TestClient(TestServer(create_app(settings), host="127.0.0.1")) as client:
        yield client


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "no CSRF field on the page"
    return found.group(1)


async def login_token(ui: ApiClient) -> str:
    """GET the login form as a browser does: its CSRF token (the client keeps the cookie)."""
    page = await ui.get("/ui/login")
    assert page.status == 200
    return csrf_of(await page.text())


async def log_in(ui: ApiClient, key: str = API_KEY) -> str:
    """Log in through the form; the session's CSRF token."""
    response = await ui.post("/ui/login", data={"key": key, "csrf": await login_token(ui)})
    assert response.status == 200 and response.url.path == "/ui"
    return csrf_of(await response.text())


async def enqueue_email(api: ApiClient, **changes: Any) -> str:
    response = await api.post("/jobs/email", json=EMAIL | changes)
    assert response.status == 202, await response.text()
    job_id: str = (await response.json())["job_id"]
    return job_id


async def test_login_sets_a_strict_cookie_and_logout_ends_the_session(
    ui: ApiClient, redis: ArqRedis
) -> None:
    login_page = await ui.get("/ui/login")
    assert login_page.status == 200 and 'name="key"' in await login_page.text()
    token = csrf_of(await login_page.text())

    wrong = await ui.post(
        "/ui/login", data={"key": "not-a-key", "csrf": token}, allow_redirects=False
    )
    assert wrong.status == 401
    assert "not valid" in await wrong.text()
    assert "asyncjobs_session" not in wrong.cookies

    response = await ui.post(
        "/ui/login", data={"key": API_KEY, "csrf": token}, allow_redirects=False
    )
    assert response.status == 303 and response.headers["Location"] == "/ui"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain HTTP here
    session_id = cookie.split(";")[0].split("=", 1)[1]
    ttl = await redis.ttl(SESSION_KEY_PREFIX + session_id)
    assert SESSION_TTL_S - 60 < ttl <= SESSION_TTL_S

    page = await ui.get("/ui")
    assert page.status == 200
    csrf = csrf_of(await page.text())
    assert (await ui.post("/ui/logout", data={}, allow_redirects=False)).status == 403
    logout = await ui.post("/ui/logout", data={"csrf": csrf}, allow_redirects=False)
    assert logout.status == 303 and logout.headers["Location"] == "/ui/login"
    assert not await redis.exists(SESSION_KEY_PREFIX + session_id)
    assert (await ui.get("/ui", allow_redirects=False)).status == 303


@pytest.mark.slow
async def test_failed_sign_ins_are_limited_per_address(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    """Three failures allowed: the fourth try is 429 with Retry-After, even with the right key;
    once the window has ended the right key works again."""
    window = 4.0
    app = create_app(make_settings(login_max_failures=3, login_failure_window=window))
    async with TestClient(TestServer(app, host="127.0.0.1")) as ui:
        token = await login_token(ui)
        started = await start_of_a_window(window)
        for _ in range(3):
            guess = await ui.post("/ui/login", data={"key": "guess", "csrf": token})
            assert guess.status == 401
        right = {"key": API_KEY, "csrf": token}
        blocked = await ui.post("/ui/login", data=right, allow_redirects=False)
        assert window_number(window) == started, "4 sign-ins took longer than 3.5 s"
        assert blocked.status == 429
        assert 1 <= int(blocked.headers["Retry-After"]) <= window
        assert "Too many failed sign-ins" in await blocked.text()
        assert "asyncjobs_session" not in blocked.cookies

        async def signed_in() -> bool:
            response = await ui.post("/ui/login", data=right, allow_redirects=False)
            return response.status == 303

        await wait_for(signed_in, timeout=10, interval=0.25, what="the window to end")


async def test_cookie_is_secure_behind_a_tls_proxy(ui: ApiClient) -> None:
    response = await ui.post(
        "/ui/login",
        data={"key": API_KEY, "csrf": await login_token(ui)},
        headers={"X-Forwarded-Proto": "https"},
        allow_redirects=False,
    )
    assert response.status == 303
    assert "Secure" in response.headers["Set-Cookie"]


async def test_pages_need_a_session_and_a_bearer_key_is_not_one(ui: ApiClient) -> None:
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    for path in [*PAGES, "/ui/jobs/some-job", "/ui/jobs/some-job/events", "/ui/nowhere"]:
        response = await ui.get(path, headers=bearer, allow_redirects=False)
        assert response.status == 303, path
        assert response.headers["Location"] == "/ui/login", path
    for path in ["/ui/jobs/some-job/abort", "/ui/dead-letter/x/retry", "/ui/sources/export"]:
        response = await ui.post(path, data={"csrf": "x"}, allow_redirects=False)
        assert response.status == 303, path
    assert (await ui.get("/ui/static/app.js")).status == 200
    # a session of a forged id is no session either
    ui.session.cookie_jar.update_cookies({"asyncjobs_session": "A" * 43})
    assert (await ui.get("/ui", allow_redirects=False)).status == 303


async def test_the_api_keeps_its_keys_and_json_errors(ui: ApiClient) -> None:
    for path in ["/uix", "/ui-jobs", "/jobs/abc"]:
        response = await ui.get(path)
        assert response.status == 401, path
        assert (await response.json())["error"] == "unauthorized"


async def test_actions_need_the_sessions_csrf_token(
    ui: ApiClient, api: ApiClient, redis: ArqRedis
) -> None:
    job_id = await enqueue_email(api)  # no worker: it stays queued
    csrf = await log_in(ui)
    abort = f"/ui/jobs/{job_id}/abort"
    for data in [{}, {"csrf": ""}, {"csrf": csrf[:-1] + "x"}, {"token": csrf}]:
        response = await ui.post(abort, data=data, allow_redirects=False)
        assert response.status == 403, data
        assert "CSRF" in await response.text()
    assert await redis.zscore(abort_jobs_ss, job_id) is None

    response = await ui.post(abort, data={"csrf": csrf}, allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == f"/ui/jobs/{job_id}"
    assert await redis.zscore(abort_jobs_ss, job_id) is not None

    # one session's token is no good with another session
    async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as other:
        form = await other.get(ui.make_url("/ui/login"))
        token = csrf_of(await form.text())
        login = await other.post(ui.make_url("/ui/login"), data={"key": API_KEY, "csrf": token})
        assert login.status == 200 and login.url.path == "/ui"
        stolen = await other.post(ui.make_url(abort), data={"csrf": csrf}, allow_redirects=False)
        assert stolen.status == 403


async def test_read_only_key_can_look_but_not_act(
    ui: ApiClient, api: ApiClient, redis: ArqRedis
) -> None:
    job_id = await enqueue_email(api)
    csrf = await log_in(ui, READ_KEY)
    for path in [*PAGES, f"/ui/jobs/{job_id}"]:
        response = await ui.get(path)
        assert response.status == 200, path
    page = await (await ui.get(f"/ui/jobs/{job_id}")).text()
    assert "read-only" in page and "disabled" in page
    for path in [f"/ui/jobs/{job_id}/abort", "/ui/dead-letter/x/retry", "/ui/sources/export"]:
        response = await ui.post(path, data={"csrf": csrf}, allow_redirects=False)
        assert response.status == 403, path
        assert "read-only" in await response.text()
    assert await redis.zscore(abort_jobs_ss, job_id) is None
    assert (await ui.post("/ui/logout", data={"csrf": csrf}, allow_redirects=False)).status == 303


async def test_pages_show_jobs_dead_letters_cron_and_sources(
    ui: ApiClient,
    api: ApiClient,
    redis: ArqRedis,
    worker: Worker,
    smtp: tuple[RecordingSmtpHandler, int],
) -> None:
    smtp[0].refuse_rcpt = {"gone@example.com"}
    sent = await enqueue_email(api)
    dead = await enqueue_email(api, to="gone@example.com")
    assert (await wait_job(api, sent))["status"] == "complete"
    assert (await wait_job(api, dead))["status"] == "failed"
    source = {"url": "http://127.0.0.1:9/news", "schedule": "daily"}
    source_id = (await (await api.post("/sources", json=source)).json())["id"]
    # what the source's scrapes would have left: two documents, three failures
    await redis.sadd(source_docs_key(source_id), "doc-1", "doc-2")  # type: ignore[misc]
    failures = {"HTTP 404": 2, "timeout": 1}
    await redis.hset(source_failures_key(source_id), mapping=failures)  # type: ignore[misc]
    await log_in(ui)

    async def both_listed() -> str | None:  # finished jobs are indexed once a second
        rows = await (await ui.get("/ui/jobs/rows")).text()
        return rows if f'data-job-id="{sent}"' in rows and f'data-job-id="{dead}"' in rows else None

    await wait_for(both_listed, what="both jobs in /ui/jobs/rows")
    failed_only = await (await ui.get("/ui/jobs/rows?status=failed&window=1h")).text()
    assert f'data-job-id="{dead}"' in failed_only and sent not in failed_only
    other_function = await (await ui.get("/ui/jobs/rows?function=scrape")).text()
    assert sent not in other_function and "No jobs match" in other_function

    dead_letters = await (await ui.get("/ui/dead-letter")).text()
    assert f'data-entry-id="{dead}"' in dead_letters and "550" in dead_letters

    sources = await (await ui.get("/ui/sources")).text()
    row = re.search(rf'<tr data-source-id="{source_id}">.*?</tr>', sources, re.DOTALL)
    assert row and "http://127.0.0.1:9/news" in row.group(0)
    assert "<td>2</td>" in row.group(0) and "HTTP 404: 2, timeout: 1" in row.group(0)

    async def cron_ran() -> str | None:  # the worker runs the scheduler tick at startup
        page = await (await ui.get("/ui/cron")).text()
        row = re.search(r'<tr data-cron="cron:schedule_sources">.*?</tr>', page, re.DOTALL)
        return page if row and "never" not in row.group(0) else None

    cron = await wait_for(cron_ran, what="the scheduler tick's record on /ui/cron")
    assert "cron:daily_cleanup" in cron and "hour 3, minute 0, second 0" in cron

    async def counted() -> str | None:  # the worker writes its figures once a second
        page = await (await ui.get("/ui")).text()
        figures = [r'id="workers">1<', r'id="completed">[1-9]\d*<', r'id="failed">[1-9]\d*<']
        return page if all(re.search(figure, page) for figure in figures) else None

    overview = await wait_for(counted, what="the worker and its jobs on the overview")
    assert "<svg" in overview and 'class="ok"' in overview


async def test_job_page_redacts_secrets_and_escapes_html(
    ui: ApiClient, api: ApiClient, worker: Worker
) -> None:
    job_id = await enqueue_email(
        api,
        subject="<script>alert('pwned')</script>",
        headers={"X-Api-Key": "sekrit-1", "X-Auth-Token": "sekrit-2", "X-Plain": "visible"},
    )
    await wait_job(api, job_id)
    await log_in(ui)
    page = await (await ui.get(f"/ui/jobs/{job_id}")).text()
    assert "sekrit" not in page
    # each value once (a folded object's one-line preview shows them again)
    assert page.count('class="v string">&#34;***&#34;<') == 2 and "visible" in page
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt;" in page
    assert 'id="status" class="badge complete"' in page


async def test_job_page_errors_are_pages(ui: ApiClient, api: ApiClient, worker: Worker) -> None:
    csrf = await log_in(ui)
    missing = await ui.get("/ui/jobs/no-such-job")
    assert missing.status == 404 and missing.content_type == "text/html"
    job_id = await enqueue_email(api)
    await wait_job(api, job_id)
    late = await ui.post(f"/ui/jobs/{job_id}/abort", data={"csrf": csrf})
    assert late.status == 409 and "already finished" in await late.text()


async def test_event_stream_sends_the_state_until_the_job_is_finished(
    ui: ApiClient, api: ApiClient, worker: Worker
) -> None:
    job_id = await enqueue_email(api)
    await log_in(ui)
    response = await ui.get(f"/ui/jobs/{job_id}/events")
    assert response.content_type == "text/event-stream"
    body = await response.text()  # returns: the server ends the stream once the job finished
    states = [line.removeprefix("data: ") for line in body.splitlines() if "status" in line]
    assert '"status": "complete"' in states[-1]
    assert body.rstrip().endswith("event: end\ndata: {}")


async def test_retry_and_export_buttons_enqueue_jobs(
    ui: ApiClient,
    api: ApiClient,
    redis: ArqRedis,
    worker: Worker,
    smtp: tuple[RecordingSmtpHandler, int],
) -> None:
    smtp[0].refuse_rcpt = {"gone@example.com"}
    dead = await enqueue_email(api, to="gone@example.com")
    await wait_job(api, dead)
    smtp[0].refuse_rcpt = set()
    csrf = await log_in(ui)

    retried = await ui.post(f"/ui/dead-letter/{dead}/retry", data={"csrf": csrf})
    assert retried.status == 200 and retried.url.path.startswith("/ui/jobs/")
    new_job = retried.url.path.rsplit("/", 1)[1]
    assert new_job != dead
    assert (await wait_job(api, new_job))["status"] == "complete"
    assert await get_dead_letter(redis, dead) is None
    again = await ui.post(f"/ui/dead-letter/{dead}/retry", data={"csrf": csrf})
    assert again.status == 404

    exported = await ui.post("/ui/sources/export", data={"csrf": csrf})
    export_id = exported.url.path.rsplit("/", 1)[1]
    assert (await wait_job(api, export_id))["status"] == "complete"
    page = await (await ui.get(f"/ui/jobs/{export_id}")).text()
    link = f"/ui/exports/{export_id}.csv"
    assert f'href="{link}"' in page
    download = await ui.get(link)
    assert download.status == 200 and download.content_type == "text/csv"
    assert (await download.text()).startswith("id,url")


@pytest.mark.slow
async def test_newsletter_page_shows_its_progress(
    ui: ApiClient, api: ApiClient, worker: Worker
) -> None:
    body = {"recipients": [f"r{i}@example.com" for i in range(3)], "subject": "S", "text": "T"}
    response = await api.post("/jobs/newsletter", json=body)
    job_id = (await response.json())["job_id"]

    async def settled() -> str | None:
        page = await (await ui.get(f"/ui/jobs/{job_id}")).text()
        return page if "3 sent, 0 failed, 0 pending of 3" in page else None

    await log_in(ui)
    page = await wait_for(settled, what="the newsletter's progress on its page")
    assert re.search(r'<progress id="progress" max="3"\s+value="3">', page)


async def test_mail_page_lists_the_sink(ui: ApiClient, settings: Settings) -> None:
    assert settings.mail_sink_dir is not None
    settings.mail_sink_dir.mkdir(parents=True)
    message = b"X-Sink-Mail-From: a@example.com\r\nX-Sink-Rcpt-To: b@example.com\r\n"
    message += b"Subject: <b>bold</b>\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n"
    (settings.mail_sink_dir / f"{1_700_000_000_000_000_000:019d}-0123abcd.eml").write_bytes(message)
    await log_in(ui)
    page = await (await ui.get("/ui/mail")).text()
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "b@example.com" in page
    assert 'href="/ui/mail"' in page


@pytest.mark.slow
async def test_concurrent_wrong_keys_are_counted_one_by_one(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    """200 wrong keys at once: exactly the limit are checked (401), the rest are refused (429).
    The check and the count used to be two steps: all 200 got 401 and the count reached 200."""
    window = 4.0
    app = create_app(make_settings(login_max_failures=10, login_failure_window=window))
    async with TestClient(TestServer(app, host="127.0.0.1")) as ui:
        token = await login_token(ui)
        started = await start_of_a_window(window)
        responses = await asyncio.gather(
            *(ui.post("/ui/login", data={"key": f"guess-{n}", "csrf": token}) for n in range(200))
        )
        assert window_number(window) == started, "200 sign-ins took longer than 3.5 s"
    statuses = sorted(r.status for r in responses)
    assert statuses.count(401) == 10 and statuses.count(429) == 190, statuses


@pytest.mark.slow
async def test_dashboard_actions_count_against_the_keys_rate_limit(
    make_settings: Callable[..., Settings], redis: ArqRedis, tmp_path: Path
) -> None:
    window = 8.0
    settings = make_settings(
        rate_limit_requests=2, rate_limit_window=window, exports_dir=tmp_path / "exports"
    )
    async with TestClient(TestServer(create_app(settings), host="127.0.0.1")) as ui:
        csrf = await log_in(ui)
        started = await start_of_a_window(window)
        statuses = [
            (await ui.post("/ui/sources/export", data={"csrf": csrf}, allow_redirects=False)).status
            for _ in range(3)
        ]
        assert window_number(window) == started, "three posts took longer than the window"
    assert statuses[2] == 429 and 429 not in statuses[:2], statuses


async def test_cron_page_lists_schedules_with_pause_and_resume(
    ui: ApiClient, api: ApiClient, redis: ArqRedis
) -> None:
    body = {"name": "weekly digest", "cron": "0 9 * * 1", "timezone": "Europe/Paris",
            "job": {"type": "email", "body": EMAIL}}  # fmt: skip
    created = await api.post("/schedules", json=body)
    assert created.status == 201, await created.text()
    schedule_id = (await created.json())["id"]
    csrf = await log_in(ui)
    page = await (await ui.get("/ui/cron")).text()
    assert "weekly digest" in page and "0 9 * * 1" in page and "Europe/Paris" in page
    pause = f"/ui/schedules/{schedule_id}/pause"
    assert f'action="{pause}"' in page
    assert (await ui.post(pause, data={}, allow_redirects=False)).status == 403  # no CSRF
    response = await ui.post(pause, data={"csrf": csrf}, allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == "/ui/cron"
    view = await (await api.get(f"/schedules/{schedule_id}")).json()
    assert view["paused"] is True
    page = await (await ui.get("/ui/cron")).text()
    assert f'action="/ui/schedules/{schedule_id}/resume"' in page and "paused" in page
    await ui.post(f"/ui/schedules/{schedule_id}/resume", data={"csrf": csrf})
    assert (await (await api.get(f"/schedules/{schedule_id}")).json())["paused"] is False


async def test_a_delayed_jobs_page_shows_when_it_is_due(
    ui: ApiClient, api: ApiClient, redis: ArqRedis
) -> None:
    job_id = await enqueue_email(api, delay_seconds=3600)
    await log_in(ui)
    page = LexborHTMLParser(await (await ui.get(f"/ui/jobs/{job_id}")).text())
    status, due = page.css_first("#status"), page.css_first("#due_at")
    assert status is not None and status.text() == "deferred"
    assert due is not None and due.text(strip=True) != ""
