"""Fixtures: a real Redis database, a real SMTP server, a real HTML site, a real arq worker."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from ipaddress import ip_network
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import ClientSession
from aiohttp.abc import AbstractResolver
from aiohttp.test_utils import TestServer
from arq.connections import ArqRedis
from arq.worker import Worker
from redis.asyncio import Redis

from app.mailsink import server_port, start_smtp_server
from app.web import create_app
from asyncjobs.redis import connect
from asyncjobs.settings import Settings, get_settings
from jobs.context import WorkerContext
from jobs.cpulimit import CpuPool
from jobs.engine.worker import EngineWorker
from jobs.scrape.fetch import Fetcher, make_http_session
from jobs.worker import worker_options
from tests.helpers import ApiClient, api_client
from tests.servers import CrawlStats, RecordingSmtpHandler, SiteStats, make_crawl_site, make_site

pytest_plugins = ["pytester"]  # tests/engine/test_isolation.py runs pytest on small test files

# A database of its own, flushed before each test: never the one the dev stack uses (0).
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
LOOPBACK = [ip_network("127.0.0.0/8"), ip_network("::1/128")]
API_KEY, READ_KEY = "test-key-full-access", "test-key-read-only"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
T = TypeVar("T")


def isolated_teardown(
    fixture: Callable[..., AsyncIterator[T]],
) -> Callable[..., AsyncIterator[T]]:
    """Make a failed teardown an ordinary error that fails this test alone.

    A teardown that raises a BaseException (an asyncio.CancelledError) stops pytest from running
    the test's other finalizers; their fixtures stay cached and the next tests get them (the
    same Redis client, never flushed; the same TestClient; a worker never closed), so one
    failure spread to dozens of tests. An Exception lets pytest finish the teardown."""

    @functools.wraps(fixture)
    async def wrapper(*args: Any, **kwargs: Any) -> AsyncIterator[T]:
        steps = fixture(*args, **kwargs)
        yield await anext(steps)
        try:
            await anext(steps)
        except StopAsyncIteration:
            return
        except asyncio.CancelledError as exc:
            raise RuntimeError(f"the teardown of {fixture.__name__} was cancelled") from exc
        raise RuntimeError(f"fixture {fixture.__name__} yielded twice")

    return wrapper


@pytest.fixture(autouse=True)
def _no_state_from_earlier_tests() -> Iterator[None]:
    """Settings read from the environment are cached per process: each test reads its own.
    Importing worker_settings installs uvloop's event loop policy: the next test still gets
    the loop every test gets."""
    get_settings.cache_clear()
    policy = asyncio.get_event_loop_policy()
    yield
    get_settings.cache_clear()
    asyncio.set_event_loop_policy(policy)


@pytest.fixture(scope="session", autouse=True)
def _redis_must_answer() -> None:
    """No Redis is a failure, not a skip: the suite is about talking to a real one."""

    async def ping() -> None:
        client = Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=2)
        try:
            await client.ping()
        finally:
            await client.aclose()

    try:
        asyncio.run(ping())
    except Exception as exc:
        pytest.exit(f"Redis does not answer at {TEST_REDIS_URL}: {exc}", returncode=3)


@pytest.fixture
@isolated_teardown
async def redis() -> AsyncIterator[ArqRedis]:
    client = connect(Settings(_env_file=None, redis_url=TEST_REDIS_URL))
    await client.flushdb()
    yield client
    await client.aclose(close_connection_pool=True)


@pytest.fixture
@isolated_teardown
async def smtp() -> AsyncIterator[tuple[RecordingSmtpHandler, int]]:
    handler = RecordingSmtpHandler()
    server = await start_smtp_server(handler)
    yield handler, server_port(server)
    server.close()
    await server.wait_closed()


@pytest.fixture
@isolated_teardown
async def site() -> AsyncIterator[tuple[str, SiteStats]]:
    """Base URL (http://127.0.0.1:PORT) of the test site, and its hit counters."""
    stats = SiteStats()
    server = TestServer(make_site(stats), host="127.0.0.1")
    await server.start_server()
    yield f"http://127.0.0.1:{server.port}", stats
    await server.close()


@pytest.fixture
@isolated_teardown
async def crawl_site() -> AsyncIterator[tuple[int, CrawlStats]]:
    """The crawl site's port (reach it as 127.0.0.1 or localhost: two hosts) and its stats."""
    stats = CrawlStats()
    server = TestServer(make_crawl_site(stats), host="127.0.0.1")
    await server.start_server()
    assert server.port is not None
    yield server.port, stats
    await server.close()


@pytest.fixture
def make_settings(
    smtp: tuple[RecordingSmtpHandler, int], tmp_path: Path
) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "redis_url": TEST_REDIS_URL,
            # files a test's jobs write stay in its own folder, never in the checkout's var/
            "exports_dir": tmp_path / "exports",
            "images_dir": tmp_path / "images",
            "smtp_host": "127.0.0.1",
            "smtp_port": smtp[1],
            "mail_from": "asyncjobs@example.com",  # senders @example.com allowed, as by default
            "scrape_allowed_cidrs": LOOPBACK,
            "scrape_allowed_ports": None,  # the test servers listen on random ports
            "api_keys": [API_KEY],
            "api_read_keys": [READ_KEY],
            "rate_limit_requests": 100_000,  # tests enqueue hundreds at once; one test sets it low
            "scrape_timeout": 3,
            "worker_health_interval": 1,
            "retry_base_delay": 0.05,
            # politeness off unless a test is about it: most tests hit one loopback host hard
            "scrape_per_host_concurrency": 1000,
            "scrape_min_host_delay": 0,
            "retry_max_delay": 0.5,
            "email_retry_base_delay": 0.05,
            "email_retry_max_delay": 0.5,
        }
        return Settings(_env_file=None, **(values | overrides))

    return build


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


Ctx = WorkerContext  # a job's context, as the worker's startup builds it


@pytest.fixture
@isolated_teardown
async def make_ctx(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> AsyncIterator[Callable[..., Ctx]]:
    """Build job contexts with settings overrides (and optionally a test DNS resolver), each
    with a real HTTP session, closed at the end of the test."""
    sessions, pools = [], []

    def build(
        dns: AbstractResolver | None = None, job_id: str | None = None, **overrides: Any
    ) -> Ctx:
        """`job_id`: the context of a try of that job (else of a call outside a worker)."""
        settings = make_settings(**overrides)
        session = make_http_session(settings, dns=dns)
        sessions.append(session)
        pools.append(CpuPool.from_settings(settings))
        fetcher = Fetcher(session, settings, redis)
        return WorkerContext(
            {"settings": settings, "redis": redis, "fetcher": fetcher, "cpu": pools[-1]}
            | ({"job_id": job_id, "job_try": 1} if job_id else {})
        )

    try:
        yield build
    finally:
        for session in sessions:
            await session.close()
        for pool in pools:
            await pool.close()


@pytest.fixture
@isolated_teardown
async def api(settings: Settings, redis: ArqRedis) -> AsyncIterator[ApiClient]:
    """The real aiohttp app on a loopback port, with a client for it."""
    async with api_client(create_app(settings)) as client:
        yield client


async def start_worker(settings: Settings, **overrides: Any) -> tuple[Worker, asyncio.Task[None]]:
    options = worker_options(settings) | {"handle_signals": False, "poll_delay": 0.01} | overrides
    worker = EngineWorker(**options)  # what worker_settings.WorkerSettings builds
    task = asyncio.create_task(worker.main())
    return worker, task


@contextlib.asynccontextmanager
async def api_and_worker(settings: Settings) -> AsyncIterator[ApiClient]:
    """The API and a worker (no cron jobs), both with `settings`: for tests that change a
    setting both sides read."""
    worker, task = await start_worker(settings, cron_jobs=[])
    try:
        async with api_client(create_app(settings)) as client:
            yield client
    finally:
        await stop_worker(worker, task)


async def stop_worker(worker: Worker, task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await worker.close()


@pytest.fixture
@isolated_teardown
async def worker(settings: Settings, redis: ArqRedis) -> AsyncIterator[Worker]:
    """A real arq Worker running in this test's event loop."""
    running, task = await start_worker(settings)
    yield running
    await stop_worker(running, task)


@pytest.fixture
@isolated_teardown
async def http() -> AsyncIterator[ClientSession]:
    async with ClientSession() as session:
        yield session


# Figures the fault tests measure (counts of lost and duplicated work), printed after the run.
FAULT_REPORT: list[str] = []


@pytest.fixture
def fault_report() -> Callable[[str], None]:
    return FAULT_REPORT.append


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FAULT_REPORT:
        terminalreporter.section("fault test figures")
        for line in FAULT_REPORT:
            terminalreporter.write_line(line)
