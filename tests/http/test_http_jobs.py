"""HTTP jobs (`POST /jobs/http`) against real loopback receivers, through the real API and
workers: signed requests a receiver verifies, retries with Retry-After, dead letters, timeouts,
redirects, the SSRF guard's own allowlist, limits shared by two worker processes, secrets kept
out of the dashboard and the logs, and schedules."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from arq.connections import ArqRedis
from multidict import CIMultiDictProxy

from app.dashboard.data import read_arguments
from app.web import create_app
from asyncjobs.settings import Settings
from asyncjobs.signing import (
    JOB_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    TRY_HEADER,
    verify,
    verify_request,
)
from jobs.schedules import get_schedule, run_due_schedules
from tests.conftest import LOOPBACK, TEST_REDIS_URL, api_and_worker, start_worker, stop_worker
from tests.dashboard.test_dashboard import log_in
from tests.faults.procs import start_worker_process, stop_process
from tests.helpers import ApiClient, api_client, wait_for
from tests.jobwait import wait_job

SECRET = "http-jobs-test-secret"
TOKEN = "Bearer s3cr3t-t0ken-for-billing"  # must never show in the dashboard or the logs

Answer = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    """One request as the receiver got it."""

    at: float
    method: str
    path: str
    headers: CIMultiDictProxy[str]
    body: bytes
    signed: bool

    @property
    def job_id(self) -> str:
        return self.headers.get(JOB_ID_HEADER, "")

    @property
    def job_try(self) -> str:
        return self.headers.get(TRY_HEADER, "")


async def ok(request: web.Request, n: int) -> web.StreamResponse:
    return web.json_response({"ok": True, "n": n})


@dataclass
class Receiver:
    """A receiver that verifies every signature (401 if wrong or too old, as a real one
    would), records each request and answers by path: `answers[path](request, n)`, n counting
    from 1 per path. It counts the requests in flight at once."""

    base: str = ""
    answers: dict[str, Answer] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    clock_offset: float = 0.0  # seconds the receiver's clock runs ahead (a replay, later)
    in_flight: int = 0
    max_in_flight: int = 0
    released: asyncio.Event = field(default_factory=asyncio.Event)  # lets hung requests end

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        now = time.time() + self.clock_offset
        signed = verify_request(SECRET, request.headers, body, now=now)
        seen = Seen(time.monotonic(), request.method, request.path, request.headers, body, signed)
        self.seen.append(seen)
        if not signed:
            return web.Response(status=401, text="bad or old signature")
        n = sum(1 for s in self.seen if s.path == request.path)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self.answers.get(request.path, ok)(request, n)
        finally:
            self.in_flight -= 1

    def url(self, path: str) -> str:
        return self.base + path

    def at(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", hook.handle)
    # no access log: the receiver's lines are not ours (the logs test reads ours)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(access_log=None)
    hook.base = f"http://127.0.0.1:{server.port}"
    yield hook
    hook.released.set()
    await server.close()


def http_settings(make_settings: Callable[..., Settings], **overrides: Any) -> Settings:
    """Settings for HTTP jobs to loopback: the allowlist given explicitly (the scraper's
    SCRAPE_ALLOWED_CIDRS, which make_settings opens, is not theirs)."""
    values: dict[str, Any] = {
        "http_jobs_secret": SECRET,
        "http_jobs_allowed_cidrs": LOOPBACK,
        "http_jobs_allowed_ports": None,  # the receivers listen on random ports
    }
    return make_settings(**(values | overrides))


@pytest.fixture
async def service(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> AsyncIterator[ApiClient]:
    async with api_and_worker(http_settings(make_settings)) as api:
        yield api


async def post_http(api: ApiClient, body: dict[str, Any]) -> str:
    response = await api.post("/jobs/http", json=body)
    accepted = await response.json()
    assert response.status == 202, accepted
    job_id: str = accepted["job_id"]
    return job_id


# --- signatures ---------------------------------------------------------------------------------


def test_verify_accepts_its_signature_and_refuses_forgeries_and_old_timestamps() -> None:
    from asyncjobs.signing import sign

    body, now = b'{"a":1}', 1_800_000_000
    signature = sign(SECRET, now, body)
    assert verify(SECRET, str(now), body, signature, now=now + 299)
    assert not verify(SECRET, str(now), body, signature, now=now + 301)  # replayed later
    assert not verify(SECRET, str(now + 1), body, signature, now=now)  # timestamp changed
    assert not verify(SECRET, str(now), b'{"a":2}', signature, now=now)  # body changed
    assert not verify("another secret", str(now), body, signature, now=now)
    assert not verify(SECRET, None, body, signature) and not verify(SECRET, "x", body, signature)


async def test_a_receiver_verifies_the_signature_and_refuses_a_replay(
    service: ApiClient, receiver: Receiver
) -> None:
    """The receiver checks the HMAC over timestamp and body; the same request sent again once
    its timestamp is old is refused. The job id and the try come as headers."""

    async def created(request: web.Request, n: int) -> web.StreamResponse:
        headers = {"Location": "/invoices/42", "ETag": '"v1"', "X-Secret-Internal": "no"}
        return web.json_response({"invoice": 42}, status=201, headers=headers)

    receiver.answers["/tasks/invoice"] = created
    body = {
        "url": receiver.url("/tasks/invoice?tenant=7"),
        "json": {"order": 42, "lines": [1, 2]},
        "headers": {"Authorization": TOKEN, "X-Tenant": "7"},
    }
    job_id = await post_http(service, body)
    view = await wait_job(service, job_id)
    assert view["status"] == "complete" and view["tries"] == 1, view
    result = view["result"]
    assert result["status"] == 201 and result["method"] == "POST"
    assert result["headers"]["location"] == "/invoices/42" and result["headers"]["etag"] == '"v1"'
    assert "x-secret-internal" not in result["headers"]  # a subset of the headers only
    assert json.loads(result["body"]) == {"invoice": 42}
    assert result["body_truncated"] is False and result["body_limit"] == 64 * 1024
    [seen] = receiver.seen
    assert seen.signed and seen.method == "POST" and seen.job_id == job_id and seen.job_try == "1"
    assert json.loads(seen.body) == {"order": 42, "lines": [1, 2]}
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["Authorization"] == TOKEN and seen.headers["X-Tenant"] == "7"

    # A replay: the captured request, sent again 5 minutes and a second later
    receiver.clock_offset = 301
    replay_headers = {k: seen.headers[k] for k in (TIMESTAMP_HEADER, SIGNATURE_HEADER)}
    replay = await service.session.post(
        receiver.url("/tasks/invoice"), data=seen.body, headers=replay_headers
    )
    assert replay.status == 401
    assert not receiver.seen[-1].signed


# --- outcomes -----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_two_503s_with_retry_after_then_accepted(
    make_settings: Callable[..., Settings], redis: ArqRedis, receiver: Receiver
) -> None:
    """Three requests, one job id, tries 1, 2, 3, each retry at least Retry-After later (the
    backoff alone would retry after 0.05-0.1 s); the wait shows the last answer."""

    async def busy(request: web.Request, n: int) -> web.StreamResponse:
        if n <= 2:
            return web.Response(status=503, text="busy, come back", headers={"Retry-After": "1"})
        return web.Response(status=204)

    receiver.answers["/tasks/busy"] = busy
    settings = http_settings(make_settings, retry_max_delay=5)  # Retry-After is capped by it
    async with api_and_worker(settings) as api:
        job_id = await post_http(api, {"url": receiver.url("/tasks/busy"), "body": "hello"})

        async def retrying() -> dict[str, Any] | None:
            view: dict[str, Any] = await (await api.get(f"/jobs/{job_id}")).json()
            return view if view.get("error") and view.get("next_try_at") else None

        waiting = await wait_for(retrying, what="the job waiting for its retry")
        assert "HTTP 503" in waiting["error"] and "busy, come back" in waiting["error"]
        view = await wait_job(api, job_id, timeout=20)
    assert view["status"] == "complete" and view["tries"] == 3, view
    assert view["result"]["status"] == 204 and view["result"]["body_bytes"] == 0
    calls = receiver.at("/tasks/busy")
    assert [c.job_id for c in calls] == [job_id] * 3
    assert [c.job_try for c in calls] == ["1", "2", "3"]
    assert [c.body for c in calls] == [b"hello"] * 3 and all(c.signed for c in calls)
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(calls)]
    assert all(gap >= 0.99 for gap in gaps), gaps


async def test_a_400_is_dead_lettered_after_one_try_with_the_answer(
    service: ApiClient, receiver: Receiver
) -> None:
    async def refuse(request: web.Request, n: int) -> web.StreamResponse:
        return web.json_response({"error": "no such invoice 42"}, status=400)

    receiver.answers["/tasks/refuse"] = refuse
    body = {"url": receiver.url("/tasks/refuse"), "headers": {"Authorization": TOKEN}}
    job_id = await post_http(service, body)
    view = await wait_job(service, job_id)
    assert view["status"] == "failed" and view["tries"] == 1
    assert len(receiver.at("/tasks/refuse")) == 1
    entry = await (await service.get(f"/dead-letter/{job_id}")).json()
    assert entry["reason"] == "permanent" and entry["tries"] == 1
    assert "HTTP 400" in entry["error"] and "no such invoice 42" in entry["error"]
    assert entry["arguments"]["headers"]["Authorization"] == "***"  # redacted when read
    assert entry["arguments"]["url"] == receiver.url("/tasks/refuse")


async def test_a_hanging_receiver_times_out_then_the_job_is_retried(
    service: ApiClient, receiver: Receiver
) -> None:
    async def hang_once(request: web.Request, n: int) -> web.StreamResponse:
        if n == 1:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(receiver.released.wait(), 30)
        return web.Response(text="done")

    receiver.answers["/tasks/slow"] = hang_once
    job_id = await post_http(service, {"url": receiver.url("/tasks/slow"), "timeout": 0.5})
    view = await wait_job(service, job_id)
    assert view["status"] == "complete" and view["tries"] == 2, view
    assert view["result"]["body"] == "done"
    calls = receiver.at("/tasks/slow")
    assert [(c.job_id, c.job_try) for c in calls] == [(job_id, "1"), (job_id, "2")]


async def test_success_statuses_say_what_completes_the_job(
    service: ApiClient, receiver: Receiver
) -> None:
    """A DELETE that finds nothing is done, if the caller says 404 is fine; a 200 it did not
    list is a permanent failure."""

    async def gone(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=404, text="already gone")

    receiver.answers["/items/1"] = gone
    deleted = await post_http(
        service,
        {"method": "delete", "url": receiver.url("/items/1"), "success_statuses": [200, 404]},
    )
    strict = await post_http(service, {"url": receiver.url("/other"), "success_statuses": [201]})
    done, failed = await wait_job(service, deleted), await wait_job(service, strict)
    assert done["status"] == "complete" and done["result"]["status"] == 404
    assert done["result"]["method"] == "DELETE"
    assert failed["status"] == "failed" and "HTTP 200" in failed["error"]


async def test_a_large_answer_is_cut_and_the_result_says_so(
    service: ApiClient, receiver: Receiver
) -> None:
    async def large(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(body=b"x" * 200_000, content_type="text/plain")

    receiver.answers["/large"] = large
    job_id = await post_http(service, {"method": "GET", "url": receiver.url("/large")})
    result = (await wait_job(service, job_id))["result"]
    assert result["body_truncated"] is True and result["body_limit"] == 64 * 1024
    assert len(result["body"]) == 64 * 1024 and result["body_bytes"] == 200_000


# --- redirects ----------------------------------------------------------------------------------


async def test_redirects_to_the_same_host_are_followed_to_another_only_when_asked(
    service: ApiClient, receiver: Receiver
) -> None:
    """127.0.0.1 and localhost are two hosts. A 303 after a POST becomes a GET; a redirect to
    the other host fails for good unless `follow_redirects`, and then the caller's
    Authorization is not sent there."""
    port = receiver.base.rsplit(":", 1)[1]
    other = f"http://localhost:{port}/elsewhere"

    async def see_other(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=303, headers={"Location": "/landing"})

    async def away(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": other})

    receiver.answers |= {"/start": see_other, "/away": away}
    same = await post_http(service, {"url": receiver.url("/start"), "body": "x"})
    refused = await post_http(service, {"url": receiver.url("/away")})
    followed = await post_http(
        service,
        {"url": receiver.url("/away"), "follow_redirects": True,
         "headers": {"Authorization": TOKEN, "X-Keep": "1"}},
    )  # fmt: skip
    same_view = await wait_job(service, same)
    assert same_view["status"] == "complete" and same_view["result"]["redirects"] == 1
    assert same_view["result"]["url"].endswith("/landing")
    [landing] = receiver.at("/landing")
    assert landing.method == "GET" and landing.body == b"" and landing.signed
    refused_view = await wait_job(service, refused)
    assert refused_view["status"] == "failed" and "not followed" in refused_view["error"]
    followed_view = await wait_job(service, followed)
    assert followed_view["status"] == "complete", followed_view
    [there] = receiver.at("/elsewhere")
    assert there.headers.get("Host", "").startswith("localhost")
    assert "Authorization" not in there.headers and there.headers["X-Keep"] == "1"


# --- security -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"Host": "billing.internal"},
        {"Content-Length": "10"},
        {"transfer-encoding": "chunked"},
        {"Connection": "close"},
        {"Upgrade": "websocket"},
        {"X-Asyncjobs-Try": "1"},
        {"X-Asyncjobs-Signature": "sha256=forged"},
        {"X-Note": "a\r\nX-Injected: 1"},
        {"X-Note": "a\nb"},
        {"Bad Name": "x"},
    ],
)
async def test_headers_a_caller_must_not_set_are_a_422(
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    receiver: Receiver,
    headers: dict[str, str],
) -> None:
    async with api_client(create_app(http_settings(make_settings))) as api:
        response = await api.post("/jobs/http", json={"url": receiver.url("/"), "headers": headers})
        error = await response.json()
    assert response.status == 422, error
    assert [d["field"] for d in error["details"]] == ["headers"]
    assert await redis.zcard("arq:queue") == 0


async def test_loopback_is_refused_without_the_http_jobs_allowlist(
    make_settings: Callable[..., Settings], redis: ArqRedis, receiver: Receiver
) -> None:
    """The scraper's SCRAPE_ALLOWED_CIDRS allows loopback here; HTTP jobs' own allowlist is
    empty: an address is a 422 at once, a name that resolves to loopback fails for good in
    the worker, and the receiver hears nothing."""
    settings = make_settings(http_jobs_secret=SECRET, http_jobs_allowed_ports=None)
    assert settings.scrape_allowed_cidrs and not settings.http_jobs_allowed_cidrs
    port = receiver.base.rsplit(":", 1)[1]
    async with api_and_worker(settings) as api:
        response = await api.post("/jobs/http", json={"url": receiver.url("/tasks/x")})
        error = await response.json()
        assert response.status == 422
        assert error["details"][0]["field"] == "url"
        assert "not a public address" in error["details"][0]["message"]
        job_id = await post_http(api, {"url": f"http://localhost:{port}/tasks/x"})
        view = await wait_job(api, job_id)
    assert view["status"] == "failed" and view["tries"] == 1
    assert "non-public" in view["error"]
    assert receiver.seen == []


async def test_allowed_hosts_and_ports(
    make_settings: Callable[..., Settings], redis: ArqRedis, receiver: Receiver
) -> None:
    """HTTP_JOBS_ALLOWED_HOSTS names hosts whose addresses are not checked; a port outside
    HTTP_JOBS_ALLOWED_PORTS is a 422."""
    port = int(receiver.base.rsplit(":", 1)[1])
    named = make_settings(http_jobs_secret=SECRET, http_jobs_allowed_hosts="localhost",
                          http_jobs_allowed_ports=str(port))  # fmt: skip
    assert named.http_jobs_allowed_hosts == ["localhost"]
    async with api_and_worker(named) as api:
        job_id = await post_http(api, {"url": f"http://localhost:{port}/named"})
        assert (await wait_job(api, job_id))["status"] == "complete"
        other_port = await api.post("/jobs/http", json={"url": "http://localhost:1/x"})
        assert other_port.status == 422
    assert len(receiver.at("/named")) == 1


async def test_no_signing_secret_no_http_jobs(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    settings = make_settings(http_jobs_allowed_cidrs=LOOPBACK)
    assert settings.http_jobs_signing_secret is None
    async with api_client(create_app(settings)) as api:
        response = await api.post("/jobs/http", json={"url": "http://127.0.0.1/"})
        assert response.status == 422
        assert "HTTP_JOBS_SECRET" in (await response.json())["message"]
    webhook_only = make_settings(webhook_secret="w")
    assert webhook_only.http_jobs_signing_secret is not None  # WEBHOOK_SECRET by default


async def test_secrets_in_headers_stay_out_of_the_dashboard_and_the_logs(
    service: ApiClient, receiver: Receiver, redis: ArqRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    headers = {"Authorization": TOKEN, "Cookie": "session=abcdef123456", "X-Api-Key": "k-123456",
               "X-Request-Source": "billing"}  # fmt: skip
    body = {"url": receiver.url("/tasks/secret?token=query-secret"), "headers": headers}
    job_id = await post_http(service, body)
    assert (await wait_job(service, job_id))["status"] == "complete"
    shown = await read_arguments(redis, job_id)  # what /ui/jobs/<id> shows
    assert shown is not None
    assert shown["headers"] == {"Authorization": "***", "Cookie": "***", "X-Api-Key": "***",
                                "X-Request-Source": "billing"}  # fmt: skip
    assert shown["method"] == "POST" and shown["url"].startswith(receiver.url("/tasks/secret"))
    logged = "\n".join(
        f"{r.getMessage()} {json.dumps(vars(r), default=str)}" for r in caplog.records
    )
    assert job_id in logged  # the job's lines were captured
    for secret in ("s3cr3t-t0ken", "abcdef123456", "k-123456", "query-secret"):
        assert secret not in logged


async def test_the_job_page_shows_method_url_and_last_status_not_the_token(
    service: ApiClient, receiver: Receiver
) -> None:
    """/ui/jobs/<id>: the method and the URL (its arguments), the answer's status (its result,
    or its error once it failed), and `***` for the Authorization header."""

    async def refuse(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=409, text="conflict: invoice exists")

    receiver.answers["/tasks/conflict"] = refuse
    headers = {"Authorization": TOKEN}
    done = await post_http(service, {"url": receiver.url("/tasks/ok"), "headers": headers})
    failed = await post_http(service, {"url": receiver.url("/tasks/conflict"), "method": "PUT"})
    await wait_job(service, done)
    await wait_job(service, failed)
    await log_in(service)
    done_page = await (await service.get(f"/ui/jobs/{done}")).text()
    failed_page = await (await service.get(f"/ui/jobs/{failed}")).text()
    # folded JSON (app/dashboard/folded.py): each value beside its key, HTML-escaped
    assert '<span class="k">method</span> <span class="v string">&#34;POST&#34;</span>' in done_page
    assert receiver.url("/tasks/ok") in done_page
    assert '<span class="k">status</span> <span class="v number">200</span>' in done_page
    assert "***" in done_page and "s3cr3t" not in done_page
    assert "HTTP 409 from PUT" in failed_page and "conflict: invoice exists" in failed_page


# --- limits -------------------------------------------------------------------------------------


async def test_a_rate_per_target_spaces_the_requests(
    service: ApiClient, receiver: Receiver
) -> None:
    """10 jobs at 20 per second against one target: starts at least 50 ms apart, none failed
    or retried (a job waits for its turn, it does not fail)."""
    body = {"url": receiver.url("/rated"), "rate_per_second": 20}
    job_ids = [await post_http(service, body) for _ in range(10)]
    views = [await wait_job(service, job_id) for job_id in job_ids]
    assert all(v["status"] == "complete" and v["tries"] == 1 for v in views)
    starts = sorted(s.at for s in receiver.at("/rated"))
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) == 10 and min(gaps) >= 0.045, gaps


def completed_http_jobs(log: Path) -> int:
    """How many http jobs a worker process says it completed (its JSON log lines)."""
    count = 0
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            count += entry.get("function") == "http" and entry.get("outcome") == "completed"
    return count


@pytest.mark.slow
@pytest.mark.timeout(210)  # past its own waits (30 + 120 s); the global one is 120 s
async def test_a_concurrency_limit_holds_across_two_worker_processes(
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    """200 jobs, `concurrency: 5` against the group "billing", two worker processes of 20
    jobs each (`arq worker_settings.WorkerSettings`, as production runs them): the receiver
    never has more than 5 requests in flight, both processes work, none fails."""

    async def slowish(request: web.Request, n: int) -> web.StreamResponse:
        await asyncio.sleep(0.02)
        return web.Response(status=204)

    receiver.answers["/billing"] = slowish
    env = {
        "redis_url": TEST_REDIS_URL, "http_jobs_secret": SECRET,
        "http_jobs_allowed_cidrs": "127.0.0.0/8", "http_jobs_allowed_ports": "*",
        "worker_max_jobs": 20, "worker_health_interval": 1, "retry_base_delay": 0.05,
        "retry_max_delay": 0.5,
    }  # fmt: skip
    logs = [tmp_path / "worker-1.log", tmp_path / "worker-2.log"]
    workers = [await start_worker_process(log, **env) for log in logs]
    try:

        async def both_ready() -> bool:
            return all("worker ready" in log.read_text(errors="replace") for log in logs)

        await wait_for(both_ready, timeout=30, what=f"two workers ready; see {logs}")
        settings = http_settings(make_settings)
        body = {"url": receiver.url("/billing"), "limit_group": "billing", "concurrency": 5}
        async with api_client(create_app(settings)) as api:
            job_ids = await asyncio.gather(*(post_http(api, body) for _ in range(200)))
            views = [await wait_job(api, job_id, timeout=120) for job_id in job_ids]
    finally:
        for worker in workers:
            await stop_process(worker)
    assert all(v["status"] == "complete" for v in views)
    assert len(receiver.at("/billing")) == 200
    assert 1 < receiver.max_in_flight <= 5, receiver.max_in_flight
    per_worker = [completed_http_jobs(log) for log in logs]
    assert sum(per_worker) == 200 and min(per_worker) > 0, per_worker


# --- the registry, schedules, the dashboard ------------------------------------------------------


async def test_http_is_a_schedulable_job_type_with_its_arguments(service: ApiClient) -> None:
    types = {t["name"]: t for t in (await (await service.get("/jobs/types")).json())["job_types"]}
    http = types["http"]
    assert http["builtin"] and http["schedulable"] and http["endpoint"] == "/jobs/http"
    assert http["max_tries"] == 10 and {"method", "url", "headers", "json"} <= set(
        http["arguments"]["properties"]
    )


async def test_a_schedule_calls_the_url_every_monday_in_paris_and_every_minute(
    make_settings: Callable[..., Settings], redis: ArqRedis, receiver: Receiver
) -> None:
    """Call /tasks/digest every Monday at 09:00 in Paris: accepted with its next runs; a bad
    body is a 422 naming job.body.<field>; an every-60-s one runs through a worker."""
    settings = http_settings(make_settings)
    job = {"type": "http", "body": {"url": receiver.url("/tasks/digest"), "json": {"week": 1}}}
    async with api_client(create_app(settings)) as api:
        monday = await api.post(
            "/schedules", json={"cron": "0 9 * * 1", "timezone": "Europe/Paris", "job": job}
        )
        created = await monday.json()
        assert monday.status == 201, created
        assert all(run.endswith(("T07:00:00Z", "T08:00:00Z")) for run in created["next_runs"])
        bad = {"type": "http", "body": {"url": receiver.url("/"), "headers": {"Host": "x"}}}
        refused = await api.post("/schedules", json={"every": 60, "job": bad})
        assert refused.status == 422
        assert (await refused.json())["details"][0]["field"] == "job.body.headers"
        every = await (await api.post("/schedules", json={"every": 60, "job": job})).json()
    schedule = await get_schedule(redis, every["id"])
    assert schedule is not None
    tick = schedule.period_start(schedule.created_at) + timedelta(seconds=60)
    assert await run_due_schedules(redis, settings, tick) == [schedule.id]
    worker, task = await start_worker(settings, cron_jobs=[])
    try:

        async def called() -> bool:
            return bool(receiver.at("/tasks/digest"))

        await wait_for(called, what="the scheduled call")
    finally:
        await stop_worker(worker, task)
    [call] = receiver.at("/tasks/digest")
    assert call.signed and json.loads(call.body) == {"week": 1}
    assert call.job_id.startswith(f"schedule:{schedule.id}:")
