"""A user's own jobs, as a new user runs them: a module of `@job` functions in a project
directory outside the repo (which has its own `app/` and `core/` packages, a usual web-project
layout), named by JOB_MODULES, served by the real API process (`asyncjobs web`) and run by the
real worker process (`arq worker_settings.WorkerSettings`), both started from that directory."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, CookieJar, web
from aiohttp.test_utils import TestServer
from arq.connections import ArqRedis

from asyncjobs.client import Client, JobFailed, SyncClient, ValidationFailed
from asyncjobs.keys import COUNTERS_KEY
from asyncjobs.registry import unregister
from asyncjobs.settings import Settings
from asyncjobs.signing import verify_request
from jobs.engine.queue import enqueue_job
from jobs.schedules import run_due_schedules
from tests.conftest import API_KEY, AUTH, TEST_REDIS_URL
from tests.dashboard.test_dashboard import csrf_of
from tests.faults.procs import service_env, stop_process
from tests.helpers import free_port, wait_for

TASKS = '''
"""A project's own jobs."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from asyncjobs import JobContext, PermanentJobError, job


class FlakyError(Exception):
    """What the payment provider raises while it is down."""


class Invoice(BaseModel):
    number: str
    total_cents: int


@job(tries=4, backoff=(0.05, 0.2), transient=(FlakyError,), shown=("order_id",))
async def generate_invoice(ctx: JobContext, order_id: int, currency: str = "EUR") -> Invoice:
    """Render an order's invoice."""
    calls = await ctx.redis.incr(f"test:invoice-calls:{order_id}")
    if order_id == 7 and calls <= 2:  # the provider is down for the first two tries
        raise FlakyError(f"provider down (call {calls})")
    await ctx.progress(1, 1, "rendered")
    return Invoice(number=f"INV-{order_id}-{currency}-{ctx.job_try}", total_cents=order_id * 100)


class Sync(BaseModel):
    key: str


@job(tries=3)
async def sync_account(ctx: JobContext, request: Sync) -> str:
    """Fails for good until its key exists."""
    if not await ctx.redis.exists(request.key):
        raise PermanentJobError(f"{request.key} is not ready")
    return "synced " + request.key


@job(tries=1, priority="transactional")
async def nap(seconds: float) -> str:
    """Sleeps (no context: a plain coroutine works too)."""
    await asyncio.sleep(seconds)
    return "rested"
'''


WEBHOOK_SECRET = "user-jobs-webhook-secret"


@dataclass
class Service:
    base: str
    folder: Path
    logs: Path

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))


def make_project(folder: Path) -> Path:
    """A project directory: its own `app/` and `core/` (which would break anything that
    imported them as ours) and its jobs in `tasks.py`."""
    for package in ("app", "core"):
        (folder / package).mkdir(parents=True)
        (folder / package / "__init__.py").write_text(
            f'raise ImportError("the project\'s own {package} package was imported")\n'
        )
    (folder / "tasks.py").write_text(textwrap.dedent(TASKS))
    return folder


@contextlib.contextmanager
def project_module(service: Service) -> Iterator[Any]:
    """The project's `tasks` module imported in this process (its jobs registered), and
    forgotten afterwards so no other test sees them."""
    sys.path.append(str(service.folder))
    try:
        yield importlib.import_module("tasks")
    finally:
        sys.path.remove(str(service.folder))
        sys.modules.pop("tasks", None)
        for name in ("generate_invoice", "sync_account", "nap"):
            unregister(name)


def bin_of(command: str) -> str:
    return str(Path(sys.executable).parent / command)


@pytest.fixture
async def service(redis: ArqRedis, tmp_path: Path) -> AsyncIterator[Service]:
    project = make_project(tmp_path / "project")
    logs = tmp_path / "logs"
    logs.mkdir()
    port = free_port()
    env = service_env(
        redis_url=TEST_REDIS_URL, web_port=port, api_keys=API_KEY, job_modules="tasks",
        rate_limit_requests=100_000, log_format="text", scheduler_tick_seconds=1,
        webhook_secret=WEBHOOK_SECRET, scrape_allowed_cidrs="127.0.0.0/8",
        scrape_allowed_ports="*",  # the completion webhook's receiver is on loopback
    )  # fmt: skip
    env.pop("PYTHONPATH")  # as a user runs it: the installed package, not the repo's folder
    web = await asyncio.create_subprocess_exec(
        bin_of("asyncjobs"), "web", cwd=project, env=env,
        stdout=(logs / "web.log").open("ab"), stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    worker = await asyncio.create_subprocess_exec(
        bin_of("arq"), "worker_settings.WorkerSettings", cwd=project, env=env,
        stdout=(logs / "worker.log").open("ab"), stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    service = Service(f"http://127.0.0.1:{port}", project, logs)
    try:

        async def up() -> bool:
            if web.returncode is not None or worker.returncode is not None:
                raise AssertionError(f"a process exited:\n{service.log_text()[-3000:]}")
            try:
                async with ClientSession() as http, http.get(f"{service.base}/health") as r:
                    return r.status == 200 and (await r.json())["worker"]["alive"]
            except OSError:
                return False

        await wait_for(up, timeout=30, interval=0.1, what="the API and the worker")
        yield service
    finally:
        await stop_process(web)
        await stop_process(worker)


async def post(service: Service, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with (
        ClientSession(headers=AUTH) as http,
        http.post(service.base + path, json=body) as response,
    ):
        return response.status, await response.json()


async def get(service: Service, path: str) -> Any:
    async with ClientSession(headers=AUTH) as http, http.get(service.base + path) as response:
        assert response.status == 200, await response.text()
        return await (response.json() if "json" in response.content_type else response.text())


async def finished(service: Service, job_id: str, timeout: float = 20) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        async with (
            ClientSession(headers=AUTH) as http,
            http.get(f"{service.base}/jobs/{job_id}") as response,
        ):
            view: dict[str, Any] = await response.json()
        return view if view["status"] in ("complete", "failed", "aborted") else None

    return await wait_for(done, timeout=timeout, what=f"job {job_id} to finish")


async def test_bad_arguments_are_a_422_naming_the_field_and_nothing_is_enqueued(
    service: Service, redis: ArqRedis
) -> None:
    status, body = await post(service, "/jobs/generate_invoice", {"order_id": "seven"})
    assert status == 422
    assert [d["field"] for d in body["details"]] == ["order_id"]
    status, body = await post(service, "/jobs/generate_invoice", {"order_id": 1, "extra": 2})
    assert status == 422 and [d["field"] for d in body["details"]] == ["extra"]
    assert not await redis.hexists(COUNTERS_KEY, "enqueued|generate_invoice")  # type: ignore[misc]


@pytest.mark.slow
async def test_a_transient_error_is_retried_by_the_jobs_own_policy_then_it_completes(
    service: Service,
) -> None:
    status, body = await post(service, "/jobs/generate_invoice", {"order_id": 7})
    assert status == 202, body
    view = await finished(service, body["job_id"])
    assert view["status"] == "complete", view
    assert view["result"] == {"number": "INV-7-EUR-3", "total_cents": 700}  # the third try
    assert view["tries"] == 3
    assert view["steps"] == {"done": 1, "total": 1, "step": "rendered"}
    completed = 'asyncjobs_jobs_completed_total{function="generate_invoice"} 1.0'

    async def counted() -> bool:  # the worker writes its counters about once a second
        return completed in await get(service, "/metrics")

    await wait_for(counted, timeout=10, what="the completion in /metrics")
    assert "job generate_invoice " in service.log_text()


async def test_a_permanent_error_is_dead_lettered_then_retried_from_the_api(
    service: Service, redis: ArqRedis
) -> None:
    status, body = await post(service, "/jobs/sync_account", {"key": "acct:1"})
    assert status == 202, body
    job_id = body["job_id"]
    view = await finished(service, job_id)
    assert view["status"] == "failed" and view["tries"] == 1  # permanent: no retry
    entry = await get(service, f"/dead-letter/{job_id}")
    assert entry["function"] == "sync_account" and "acct:1 is not ready" in entry["error"]
    assert entry["reason"] == "permanent"
    await redis.set("acct:1", 1)
    status, retried = await post(service, f"/dead-letter/{job_id}/retry", {})
    assert status == 202, retried
    again = await finished(service, retried["job_id"])
    assert again["status"] == "complete" and again["result"] == "synced acct:1"


@pytest.mark.slow
async def test_a_schedule_of_a_users_job_fires(
    service: Service, redis: ArqRedis, make_settings: Callable[..., Settings]
) -> None:
    schedule = {"every": 60, "job": {"type": "generate_invoice", "body": {"order_id": 3}}}
    status, created = await post(service, "/schedules", schedule)
    assert status == 201, created
    # The worker's tick, at a time of the test's choosing: the first period after creation
    # (an `every: 60` schedule's first run is up to a minute away on the clock).
    with project_module(service):
        tick = datetime.fromisoformat(created["created_at"]) + timedelta(seconds=61)
        assert await run_due_schedules(redis, make_settings(), tick) == [created["id"]]
    runs = (await get(service, f"/schedules/{created['id']}/runs"))["runs"]
    view = await finished(service, runs[0]["jobs"][0]["job_id"])
    assert view["status"] == "complete" and view["result"]["number"] == "INV-3-EUR-1"
    status, refused = await post(
        service, "/schedules", {"every": 60, "job": {"type": "generate_invoice", "body": {}}}
    )
    assert status == 422 and refused["details"][0]["field"] == "job.body.order_id"


@pytest.mark.slow
async def test_abort_stops_a_running_users_job(service: Service) -> None:
    status, body = await post(service, "/jobs/nap", {"seconds": 60})
    assert status == 202
    job_id = body["job_id"]

    async def running() -> bool:
        return bool((await get(service, f"/jobs/{job_id}"))["status"] == "in_progress")

    await wait_for(running, timeout=10, what="the nap to start")
    async with (
        ClientSession(headers=AUTH) as http,
        http.delete(f"{service.base}/jobs/{job_id}") as response,
    ):
        assert response.status == 202
    started = time.monotonic()
    view = await finished(service, job_id)
    assert view["status"] == "aborted"
    assert time.monotonic() - started < 10  # not the 60 s it asked for


@pytest.mark.slow
async def test_the_users_job_shows_in_the_dashboard_and_in_job_types(service: Service) -> None:
    status, body = await post(service, "/jobs/generate_invoice", {"order_id": 11})
    assert status == 202
    await finished(service, body["job_id"])
    async with ClientSession(cookie_jar=CookieJar(unsafe=True)) as http:  # cookies of an IP
        async with http.get(f"{service.base}/ui/login") as form:
            token = csrf_of(await form.text())
        login_form = {"key": API_KEY, "csrf": token}
        async with http.post(f"{service.base}/ui/login", data=login_form) as login:
            assert login.status == 200

        async def listed() -> bool:  # the worker writes its recent jobs about once a second
            async with http.get(f"{service.base}/ui/jobs?function=generate_invoice") as page:
                return body["job_id"] in await page.text()

        await wait_for(listed, timeout=10, what="the job in /ui/jobs")
    types = {t["name"]: t for t in (await get(service, "/jobs/types"))["job_types"]}
    invoice = types["generate_invoice"]
    assert invoice["endpoint"] == "/jobs/generate_invoice" and not invoice["builtin"]
    assert invoice["max_tries"] == 4 and invoice["arguments"]["required"] == ["order_id"]
    assert invoice["result"]["properties"]["total_cents"]["type"] == "integer"
    assert types["send_email"]["builtin"] and types["send_email"]["endpoint"] == "/jobs/email"
    spec = await get(service, "/openapi.json")
    operation = spec["paths"]["/jobs/generate_invoice"]["post"]
    assert operation["operationId"] == "enqueue_generate_invoice"


async def test_a_job_no_worker_has_is_dead_lettered_with_the_reason(
    service: Service, redis: ArqRedis
) -> None:
    job_id = await enqueue_job(redis, "generate_invoce", order_id=1)  # a typo, plain arq style
    assert job_id is not None
    view = await finished(service, job_id)
    assert view["status"] == "failed"
    entry = await get(service, f"/dead-letter/{job_id}")
    assert "no job type 'generate_invoce'" in entry["error"]
    assert entry["arguments"] == {"order_id": 1}


@pytest.mark.slow
async def test_the_typed_client_async_and_sync(service: Service) -> None:
    with project_module(service) as tasks:  # imported as a web view would import it
        invoice = tasks.generate_invoice
    async with Client(service.base, API_KEY) as client:
        result = await client.run(invoice, order_id=5, timeout=20)
        assert result == {"number": "INV-5-EUR-1", "total_cents": 500}
        with pytest.raises(ValidationFailed) as refused:
            await client.enqueue("generate_invoice", order_id="five")
        assert refused.value.details[0]["field"] == "order_id"
        failing = await client.enqueue("sync_account", key="missing")
        with pytest.raises(JobFailed):
            await client.wait(failing, timeout=20)
        # the same Idempotency-Key is the same job
        first = await client.enqueue("generate_invoice", order_id=6, idempotency_key="k-6")
        second = await client.enqueue("generate_invoice", order_id=6, idempotency_key="k-6")
        assert first == second

    def from_a_sync_view() -> Any:
        with SyncClient(service.base, API_KEY) as sync:
            return sync.run("generate_invoice", order_id=8, currency="USD", timeout=20)

    assert await asyncio.to_thread(from_a_sync_view) == {
        "number": "INV-8-USD-1",
        "total_cents": 800,
    }


@pytest.mark.slow
async def test_a_delayed_users_job_reports_its_end_to_a_signed_webhook(service: Service) -> None:
    received: list[tuple[bool, dict[str, Any]]] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        signed = verify_request(WEBHOOK_SECRET, request.headers, body)  # timestamp and body
        received.append((signed, json.loads(body)))
        return web.Response(status=204)

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    async with TestServer(receiver, host="127.0.0.1") as server:
        callback = str(server.make_url("/hook"))
        body = {"order_id": 9, "delay_seconds": 1, "callback_url": callback}
        status, accepted = await post(service, "/jobs/generate_invoice", body)
        assert status == 202, accepted
        view = await get(service, f"/jobs/{accepted['job_id']}")
        assert view["status"] == "deferred" and view["due_at"] is not None

        async def delivered() -> bool:
            return bool(received)

        await wait_for(delivered, timeout=20, what="the completion webhook")
    [(signed, payload)] = received
    assert signed
    assert payload["job_id"] == accepted["job_id"] and payload["status"] == "complete"
    assert payload["result"] == {"number": "INV-9-EUR-1", "total_cents": 900}
