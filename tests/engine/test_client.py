"""asyncjobs.client against a real aiohttp server on loopback that plays the API's contract."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from asyncjobs.client import (
    AsyncJobsError,
    Client,
    ClientRequestError,
    JobFailed,
    JobStatus,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    SyncClient,
    ValidationFailed,
    WaitTimeout,
)

API_KEY = "client-test-key"
OPTIONS = ("run_at", "delay_seconds", "priority", "callback_url")


@dataclass
class Seen:
    """One request as the server received it."""

    method: str
    path: str
    authorization: str | None
    idempotency_key: str | None
    body: Any


@dataclass
class FakeJob:
    function: str
    arguments: dict[str, Any]
    polls: int = 0
    aborted: bool = False


@dataclass
class FakeApi:
    """The API's contract over an in-memory dict of jobs.

    Every request answers 503 while `unavailable` > 0 (counting down). Job names with a
    behaviour: `strict` (422), `limited` (429), `dropped` (enqueues, then drops the connection
    while `drops` > 0), `failing_job` (fails), `never_ends` (stays in progress). Any other job
    completes after `polls_to_finish` status polls with its arguments as the result."""

    polls_to_finish: int = 2
    unavailable: int = 0
    unavailable_retry_after: str | None = None
    drops: int = 0
    url: str = ""
    jobs: dict[str, FakeJob] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # Idempotency-Key -> job id
    seen: list[Seen] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/jobs/{name}", self.enqueue)
        app.router.add_get("/jobs/{job_id}", self.status)
        app.router.add_delete("/jobs/{job_id}", self.abort)
        return app

    def posts(self, name: str) -> list[Seen]:
        return [s for s in self.seen if s.method == "POST" and s.path == f"/jobs/{name}"]

    async def record(self, request: web.Request) -> Seen:
        body = await request.json() if request.can_read_body else None
        seen = Seen(
            request.method,
            request.path,
            request.headers.get("Authorization"),
            request.headers.get("Idempotency-Key"),
            body,
        )
        self.seen.append(seen)
        return seen

    async def enqueue(self, request: web.Request) -> web.StreamResponse:
        seen = await self.record(request)
        if seen.authorization != f"Bearer {API_KEY}":
            return error(401, "unauthorized", "a valid API key is required")
        name = request.match_info["name"]
        key = seen.idempotency_key
        if key is None or not isinstance(seen.body, dict):
            return error(400, "bad_request", "Idempotency-Key and a JSON object are expected")
        if name == "strict":
            detail = {"field": "order_id", "message": "Input should be a valid integer"}
            return error(422, "validation_error", "request is invalid", [detail])
        if name == "limited":
            return error(429, "too_many_requests", "slow down", headers={"Retry-After": "7"})
        if self.unavailable > 0:
            return self.unavailable_answer()
        if key not in self.keys:  # the job id follows from the key: a replay enqueues nothing
            self.keys[key] = uuid.uuid4().hex
            arguments = {k: v for k, v in seen.body.items() if k not in OPTIONS}
            self.jobs[self.keys[key]] = FakeJob(name, arguments)
        job_id = self.keys[key]
        if name == "dropped" and self.drops > 0:
            self.drops -= 1
            assert request.transport is not None
            request.transport.close()  # enqueued, but the answer never arrives
            raise asyncio.CancelledError
        return web.json_response({"job_id": job_id, "status_url": f"/jobs/{job_id}"}, status=202)

    def unavailable_answer(self) -> web.Response:
        self.unavailable -= 1
        headers = {}
        if self.unavailable_retry_after is not None:
            headers["Retry-After"] = self.unavailable_retry_after
        return error(503, "service_unavailable", "Redis is away", headers=headers)

    async def arrive(self, request: web.Request) -> web.Response | tuple[str, FakeJob | None]:
        """Record a request on a job; the 503 it gets while unavailable, else (id, job)."""
        await self.record(request)
        if self.unavailable > 0:
            return self.unavailable_answer()
        job_id = request.match_info["job_id"]
        return job_id, self.jobs.get(job_id)

    async def status(self, request: web.Request) -> web.Response:
        arrived = await self.arrive(request)
        if isinstance(arrived, web.Response):
            return arrived
        job_id, job = arrived
        if job is None:
            view = {"job_id": job_id, "status": "not_found", "function": None}
            return web.json_response(
                {**view, "result": None, "error": None, "tries": 0}, status=404
            )
        job.polls += 1
        return web.json_response(self.view(job_id, job))

    def view(self, job_id: str, job: FakeJob) -> dict[str, Any]:
        view: dict[str, Any] = {"job_id": job_id, "function": job.function, "result": None}
        view |= {"error": None, "tries": 1, "status": "in_progress"}
        if job.aborted:
            view |= {"status": "aborted", "error": "CancelledError"}
        elif job.function == "never_ends" or job.polls < self.polls_to_finish:
            view["status"] = "queued" if job.polls == 1 else "in_progress"
        elif job.function == "failing_job":
            view |= {"status": "failed", "error": "ValueError: no such order", "tries": 3}
        else:
            view |= {"status": "complete", "result": {"echo": job.arguments}}
        return view

    async def abort(self, request: web.Request) -> web.Response:
        arrived = await self.arrive(request)
        if isinstance(arrived, web.Response):
            return arrived
        job_id, job = arrived
        if job is None:
            return error(404, "not_found", f"no job {job_id}")
        if job.aborted or job.polls >= self.polls_to_finish:
            return error(409, "conflict", f"job {job_id} has already finished")
        job.aborted = True
        return web.json_response({"job_id": job_id, "status_url": f"/jobs/{job_id}"}, status=202)


def error(
    status: int,
    code: str,
    message: str,
    details: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": code, "message": message, "details": details or []}
    return web.json_response(body, status=status, headers=headers)


@pytest.fixture
async def api() -> AsyncIterator[FakeApi]:
    fake = FakeApi()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("/"))
    try:
        yield fake
    finally:
        await server.close()


@pytest.fixture
async def client(api: FakeApi) -> AsyncIterator[Client]:
    async with Client(api.url, API_KEY, timeout=5.0) as client:
        yield client


async def generate_invoice(order_id: int) -> str:
    """A job function as a module declares it (here without `@job`: only its name matters)."""
    return f"invoice for {order_id}"


# -- enqueue ------------------------------------------------------------------------------------


async def test_enqueue_sends_key_body_options_and_an_idempotency_key(
    api: FakeApi, client: Client
) -> None:
    run_at = datetime.now(UTC) + timedelta(minutes=5)
    job_id = await client.enqueue(
        "send_receipt",
        order_id=42,
        lines=["a", "b"],
        run_at=run_at,
        priority="transactional",
        callback_url="https://example.com/hook",
    )
    [seen] = api.posts("send_receipt")
    assert seen.authorization == f"Bearer {API_KEY}"
    assert seen.body == {
        "order_id": 42,
        "lines": ["a", "b"],
        "run_at": run_at.isoformat(),
        "priority": "transactional",
        "callback_url": "https://example.com/hook",
    }
    assert seen.idempotency_key is not None and len(seen.idempotency_key) == 32
    assert job_id == api.keys[seen.idempotency_key]
    assert api.jobs[job_id].arguments == {"order_id": 42, "lines": ["a", "b"]}

    # a second call gets a fresh key; a key the caller gives is sent as it is
    other = await client.enqueue("send_receipt", order_id=43, delay_seconds=1.5)
    again = await client.enqueue("send_receipt", order_id=44, idempotency_key="order-44")
    first, second, third = api.posts("send_receipt")
    assert second.idempotency_key not in (None, first.idempotency_key)
    assert second.body == {"order_id": 43, "delay_seconds": 1.5}
    assert third.idempotency_key == "order-44"
    assert len({job_id, other, again}) == 3


async def test_enqueue_checks_locally_what_it_can(api: FakeApi, client: Client) -> None:
    with pytest.raises(ValueError, match="time zone"):
        await client.enqueue("send_receipt", run_at=datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="idempotency key"):
        await client.enqueue("send_receipt", idempotency_key="caf\u00e9")
    assert api.seen == []


async def test_a_wrong_api_key_is_a_client_error(api: FakeApi) -> None:
    async with Client(api.url, "not-the-key") as client:
        with pytest.raises(ClientRequestError) as caught:
            await client.enqueue("send_receipt", order_id=1)
    assert (caught.value.status, caught.value.code) == (401, "unauthorized")
    assert len(api.seen) == 1


async def test_422_raises_validation_failed_with_the_field_and_is_not_retried(
    api: FakeApi, client: Client
) -> None:
    with pytest.raises(ValidationFailed) as caught:
        await client.enqueue("strict", order_id="forty-two")
    exc = caught.value
    assert (exc.status, exc.code, exc.message) == (422, "validation_error", "request is invalid")
    assert [d["field"] for d in exc.details] == ["order_id"]
    assert "order_id" in str(exc)
    assert len(api.posts("strict")) == 1


async def test_503_is_retried_with_the_same_key_and_body(api: FakeApi) -> None:
    api.unavailable = 2  # no Retry-After: the client backs off 0.2 s, then 0.4 s
    async with Client(api.url, API_KEY) as client:
        started = time.monotonic()
        job_id = await client.enqueue("flaky", order_id=7, priority="bulk")
        elapsed = time.monotonic() - started
    tries = api.posts("flaky")
    assert len(tries) == 3
    assert len({t.idempotency_key for t in tries}) == 1
    assert all(t.body == {"order_id": 7, "priority": "bulk"} for t in tries)
    assert job_id == api.keys[str(tries[0].idempotency_key)]
    assert list(api.jobs) == [job_id]
    assert 0.55 <= elapsed < 2.0


async def test_503_after_the_last_retry_raises_service_unavailable(api: FakeApi) -> None:
    api.unavailable, api.unavailable_retry_after = 5, "0"
    async with Client(api.url, API_KEY, retries_503=1) as client:
        with pytest.raises(ServiceUnavailable) as caught:
            await client.enqueue("flaky", order_id=7)
    tries = api.posts("flaky")
    assert len(tries) == 2
    assert tries[0].idempotency_key == tries[1].idempotency_key
    exc = caught.value
    assert (exc.status, exc.retry_after) == (503, 0.0)
    # the key it used, to try again later without a risk of a second job
    assert exc.idempotency_key == tries[0].idempotency_key
    assert api.jobs == {}


async def test_an_enqueue_without_an_answer_is_retried_with_the_same_key(
    api: FakeApi, client: Client
) -> None:
    api.drops = 1  # the server enqueues, then the connection drops before the answer
    job_id = await client.enqueue("dropped", order_id=9)
    tries = api.posts("dropped")
    assert len(tries) == 2
    assert tries[0].idempotency_key == tries[1].idempotency_key
    assert tries[0].body == tries[1].body == {"order_id": 9}
    assert list(api.jobs) == [job_id]  # one job: the retry was a replay


async def test_429_raises_rate_limited_with_retry_after_and_is_not_retried(
    api: FakeApi, client: Client
) -> None:
    with pytest.raises(RateLimited) as caught:
        await client.enqueue("limited", order_id=1)
    assert (caught.value.status, caught.value.retry_after) == (429, 7.0)
    assert len(api.posts("limited")) == 1


async def test_a_job_function_stands_for_its_name(api: FakeApi, client: Client) -> None:
    job_id = await client.enqueue(generate_invoice, order_id=5)
    [seen] = api.posts("generate_invoice")
    assert seen.body == {"order_id": 5}
    assert api.jobs[job_id].function == "generate_invoice"
    assert await client.run(generate_invoice, order_id=6, timeout=5) == {"echo": {"order_id": 6}}


# -- status, wait, abort -----------------------------------------------------------------------


async def test_wait_returns_the_result_of_a_complete_job(api: FakeApi, client: Client) -> None:
    job_id = await client.enqueue("send_receipt", order_id=3)
    first = await client.status(job_id)
    assert (first.status, first.finished, first.function) == ("queued", False, "send_receipt")
    assert await client.wait(job_id, timeout=5, poll_interval=0.01) == {"echo": {"order_id": 3}}
    done = await client.status(job_id)
    assert done.finished and done.result == {"echo": {"order_id": 3}}
    assert done.raw["status"] == "complete"


async def test_wait_raises_job_failed_for_a_failed_job(api: FakeApi, client: Client) -> None:
    job_id = await client.enqueue("failing_job", order_id=3)
    with pytest.raises(JobFailed) as caught:
        await client.wait(job_id, timeout=5, poll_interval=0.01)
    job = caught.value.job
    assert (job.job_id, job.status, job.tries) == (job_id, "failed", 3)
    assert job.error == "ValueError: no such order"
    assert "no such order" in str(caught.value)


async def test_wait_raises_wait_timeout_at_its_deadline(api: FakeApi, client: Client) -> None:
    job_id = await client.enqueue("never_ends")
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as caught:
        await client.wait(job_id, timeout=0.4, poll_interval=0.05)
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 0.4 + 1.0
    assert caught.value.job.status == "in_progress"
    # it polled, more and more slowly: 0, 0.05, 0.15, 0.35, 0.4 s (every 0.05 s: 9 polls)
    assert 3 <= api.jobs[job_id].polls <= 6


async def test_an_unknown_job(api: FakeApi, client: Client) -> None:
    missing = await client.status("no-such-job")
    assert missing == JobStatus(job_id="no-such-job", status="not_found")
    with pytest.raises(NotFound):
        await client.wait("no-such-job", timeout=5)
    with pytest.raises(NotFound) as caught:
        await client.abort("no-such-job")
    assert caught.value.code == "not_found"


async def test_abort(api: FakeApi, client: Client) -> None:
    job_id = await client.enqueue("send_receipt", order_id=1)
    await client.abort(job_id)
    assert (await client.status(job_id)).status == "aborted"
    with pytest.raises(JobFailed) as caught:
        await client.wait(job_id, timeout=5)
    assert caught.value.job.status == "aborted"
    with pytest.raises(ClientRequestError) as conflict:
        await client.abort(job_id)
    assert conflict.value.status == 409
    assert len([s for s in api.seen if s.method == "DELETE"]) == 2


async def test_status_is_retried_on_503_and_wait_polls_through_it(api: FakeApi) -> None:
    api.unavailable_retry_after = "0"
    async with Client(api.url, API_KEY, retries_503=1) as client:
        job_id = await client.enqueue("send_receipt", order_id=2)
        api.unavailable = 1
        assert (await client.status(job_id)).status == "queued"
        gets = [s for s in api.seen if s.method == "GET"]
        assert len(gets) == 2
        api.unavailable = 5  # more than status() retries: wait() keeps polling anyway
        assert await client.wait(job_id, timeout=5, poll_interval=0.01) == {"echo": {"order_id": 2}}
        assert api.unavailable == 0


async def test_abort_is_never_retried(api: FakeApi, client: Client) -> None:
    job_id = await client.enqueue("send_receipt", order_id=1)
    api.unavailable, api.unavailable_retry_after = 2, "0"
    with pytest.raises(ServiceUnavailable):
        await client.abort(job_id)
    assert len([s for s in api.seen if s.method == "DELETE"]) == 1
    assert not api.jobs[job_id].aborted


# -- the sync client ---------------------------------------------------------------------------


@pytest.fixture
def threaded_api() -> Iterator[FakeApi]:
    """The fake API on a loop of its own in a thread, for tests that are plain functions."""
    fake = FakeApi()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(fake.app())

    async def start() -> str:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    try:
        fake.url = asyncio.run_coroutine_threadsafe(start(), loop).result(5)
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def client_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "asyncjobs-client"]


def test_sync_client(threaded_api: FakeApi) -> None:
    before = client_threads()
    with SyncClient(threaded_api.url, API_KEY, timeout=5.0) as client:
        assert client_threads() == before  # the loop starts on the first call
        job_id = client.enqueue(generate_invoice, order_id=8, priority="bulk")
        assert client.status(job_id).status == "queued"
        assert client.wait(job_id, timeout=5, poll_interval=0.01) == {"echo": {"order_id": 8}}
        assert client.run("send_receipt", order_id=9, timeout=5) == {"echo": {"order_id": 9}}
        with pytest.raises(JobFailed):
            client.run("failing_job", timeout=5)
        with pytest.raises(ValidationFailed):
            client.enqueue("strict", order_id="x")
        assert len(client_threads()) == len(before) + 1
    assert client_threads() == before  # close() stopped its thread
    [seen] = threaded_api.posts("generate_invoice")
    assert seen.authorization == f"Bearer {API_KEY}"
    assert seen.body == {"order_id": 8, "priority": "bulk"}
    with pytest.raises(RuntimeError, match="closed"):
        client.status(job_id)


def test_sync_client_close_without_a_call_and_twice() -> None:
    client = SyncClient("http://127.0.0.1:9", API_KEY)
    client.close()
    client.close()
    with pytest.raises(RuntimeError, match="closed"):
        client.enqueue("send_receipt")


def test_errors_are_one_family() -> None:
    for error in (ValidationFailed, RateLimited, NotFound, ServiceUnavailable, JobFailed):
        assert issubclass(error, AsyncJobsError)
    assert json.dumps(JobStatus("j", "queued").raw) == "{}"
