"""Fixtures: a real Redis database, a real SMTP server, a real HTML site, a real arq worker."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
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
from redis import Redis as SyncRedis
from redis.exceptions import RedisError

from app.mailsink import server_port, start_smtp_server
from app.web import create_app
from asyncjobs.redis import connect
from asyncjobs.settings import Settings, get_settings
from jobs.context import WorkerContext
from jobs.cpulimit import CpuPool
from jobs.engine.worker import EngineWorker
from jobs.scrape.fetch import Fetcher, make_http_session
from jobs.worker import worker_options
from tests.helpers import ApiClient, api_client, free_port
from tests.servers import CrawlStats, RecordingSmtpHandler, SiteStats, make_crawl_site, make_site

pytest_plugins = ["pytester"]  # tests/engine/test_isolation.py runs pytest on small test files

# The suite's Redis: a redis-server of its own on a free loopback port, started for the session
# (pytest_sessionstart), unless TEST_REDIS_URL names one. Exported, so that every process the
# tests start (workers, APIs, inner pytest runs) uses the same server. Before each test its
# database is flushed: with a server of its own all of it (FLUSHALL), with TEST_REDIS_URL only
# that database, never the one the dev stack uses (0).
_OWN_REDIS_PORT = None if os.environ.get("TEST_REDIS_URL") else free_port()
if _OWN_REDIS_PORT is not None:
    os.environ["TEST_REDIS_URL"] = f"redis://127.0.0.1:{_OWN_REDIS_PORT}/13"
TEST_REDIS_URL = os.environ["TEST_REDIS_URL"]
NO_REDIS_SERVER = (
    "redis-server is not installed: install it (apt-get install redis-server; "
    "brew install redis) or point TEST_REDIS_URL at a Redis (redis://127.0.0.1:6379/13)"
)

# A developer's `.env` (Settings read one from the working directory) never reaches a test:
# every Settings() in this process reads the environment only; nor do the service settings of
# the shell that runs the suite (REDIS_URL, API_KEYS, ...), here or in the processes it starts.
Settings.model_config["env_file"] = None
for _name in [n for n in os.environ if n.lower() in Settings.model_fields]:
    del os.environ[_name]
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
    """Settings read from the environment are cached per process: each test reads its own."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


_suite_redis: subprocess.Popen[bytes] | None = None  # the redis-server this session started
_suite_redis_dir: Path | None = None


def _die_with_the_tests() -> None:
    """In the redis-server child, before exec: SIGTERM when the test process dies, even when
    it is killed, so no server outlives the run."""
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _redis_answers(url: str) -> bool:
    client = SyncRedis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        return bool(client.ping())
    except (RedisError, OSError):
        return False
    finally:
        client.close()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Start the suite's redis-server (unless TEST_REDIS_URL names one); either way, no Redis
    is a failure at once, not a skip: the suite is about talking to a real one."""
    global _suite_redis, _suite_redis_dir
    if _OWN_REDIS_PORT is not None and _suite_redis is None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.exit(NO_REDIS_SERVER, returncode=3)
        _suite_redis_dir = Path(tempfile.mkdtemp(prefix="asyncjobs-test-redis-"))
        with (_suite_redis_dir / "redis.log").open("ab") as log:
            _suite_redis = subprocess.Popen(
                [binary, "--port", str(_OWN_REDIS_PORT), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(_suite_redis_dir)],
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_the_tests,
            )  # fmt: skip
        deadline = time.monotonic() + 15
        while not _redis_answers(TEST_REDIS_URL):
            if _suite_redis.poll() is not None or time.monotonic() > deadline:
                log_text = (_suite_redis_dir / "redis.log").read_text(errors="replace")
                pytest.exit(f"the suite's redis-server did not start:\n{log_text}", returncode=3)
            time.sleep(0.05)
    elif not _redis_answers(TEST_REDIS_URL):
        pytest.exit(f"Redis does not answer at TEST_REDIS_URL={TEST_REDIS_URL}", returncode=3)


def pytest_sessionfinish(session: pytest.Session) -> None:
    global _suite_redis, _suite_redis_dir
    if _suite_redis is not None:
        _suite_redis.terminate()
        try:
            _suite_redis.wait(15)
        except subprocess.TimeoutExpired:
            _suite_redis.kill()
            _suite_redis.wait()
        _suite_redis = None
    if _suite_redis_dir is not None:
        shutil.rmtree(_suite_redis_dir, ignore_errors=True)
        _suite_redis_dir = None


@pytest.fixture(autouse=True)
def _flushed_redis() -> None:
    """Each test starts from an empty Redis: no rate-limit window, quota, job or lock of an
    earlier test. The whole server when it is the suite's own (every database a test may use),
    else TEST_REDIS_URL's database only (the server may hold others' data)."""
    client = SyncRedis.from_url(TEST_REDIS_URL, socket_connect_timeout=2, socket_timeout=10)
    try:
        if _suite_redis is not None:
            client.flushall()
        else:
            client.flushdb()
    finally:
        client.close()


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


# The quick run (`-m "not slow"`) stays under 2 minutes only while every test over SLOW_S
# (setup and call) says @pytest.mark.slow: the ones that took twice that unmarked are listed.
SLOW_S = 1.5
_durations: dict[str, float] = {}
_unmarked: set[str] = set()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _unmarked.update(item.nodeid for item in items if item.get_closest_marker("slow") is None)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when in ("setup", "call"):
        _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FAULT_REPORT:
        terminalreporter.section("fault test figures")
        for line in FAULT_REPORT:
            terminalreporter.write_line(line)
    unmarked = {n: d for n, d in _durations.items() if n in _unmarked and d > 2 * SLOW_S}
    if unmarked:
        terminalreporter.section("unmarked slow tests")
        terminalreporter.write_line(
            f"over {2 * SLOW_S:g} s (setup and call) without @pytest.mark.slow (a loaded machine "
            f"slows every test: rerun before marking one):"
        )
        for nodeid, seconds in sorted(unmarked.items(), key=lambda item: -item[1]):
            terminalreporter.write_line(f"{seconds:6.1f} s  {nodeid}")
