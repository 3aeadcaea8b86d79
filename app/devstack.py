"""`python -m app dev`: the whole stack in one command, for a laptop without Docker.

Starts what is missing (a `redis-server` child when none answers at REDIS_URL, an in-process SMTP
sink writing .eml files when SMTP_HOST is unset), then the workers (`python -m app worker`: one
`arq worker_settings.WorkerSettings` process per CPU, supervised) and the web API. Ctrl-C stops
all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web
from pydantic import SecretStr
from redis.exceptions import RedisError

from app.mailsink import MaildirHandler, server_port, start_smtp_server
from app.supervisor import STOP_MARGIN_S, process_count
from app.web import app_runner
from asyncjobs.arqcompat import health_check_key_suffix
from asyncjobs.redis import connect, redis_answers
from asyncjobs.settings import Settings

log = logging.getLogger("app.dev")

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
DEFAULT_SINK_PORT = 8025
CHILD_STOP_TIMEOUT_S = 15.0


class DevStackError(RuntimeError):
    """The dev stack cannot start; the message says what to do."""


WORKER_READY_S = 60.0  # the banner waits this long for a worker's first health check


async def run_dev(settings: Settings, var_dir: Path = Path("var")) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    settings = with_api_key(settings)
    check_port_free(settings.web_host, settings.web_port)  # before anything is started
    async with contextlib.AsyncExitStack() as stack:
        settings = await stack.enter_async_context(local_redis(settings, var_dir))
        settings = await stack.enter_async_context(local_mail_sink(settings, var_dir))
        worker = await stack.enter_async_context(worker_process(settings))
        await stack.enter_async_context(web_server(settings))
        if not await _wait_until(lambda: worker_ready(settings), timeout=WORKER_READY_S):
            log.warning("the worker is not ready after %g s; see its log above", WORKER_READY_S)
        print_banner(settings)  # once the API and a worker answer, not before
        worker_exit = asyncio.ensure_future(worker.wait())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({worker_exit, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if worker_exit.done():
            log.error("worker exited with code %s; stopping", worker.returncode)
            return 1
        worker_exit.cancel()
        log.info("stopping...")
    return 0


def with_api_key(settings: Settings) -> Settings:
    """Dev only: with no API_KEYS set, make one up for this run (printed in the banner)."""
    if settings.api_keys:
        return settings
    key = SecretStr(secrets.token_urlsafe(24))
    log.info("no API_KEYS set: generated a key for this run")
    return settings.model_copy(update={"api_keys": [key]})


@contextlib.asynccontextmanager
async def local_redis(settings: Settings, var_dir: Path) -> AsyncIterator[Settings]:
    if await redis_answers(settings.redis_url):
        log.info("using Redis at %s", settings.redis_url)
        yield settings
        return
    parts = urlsplit(settings.redis_url)
    if parts.hostname not in LOOPBACK_HOSTS:
        raise DevStackError(f"Redis at {settings.redis_url} does not answer")
    binary = shutil.which("redis-server")
    if binary is None:
        raise DevStackError(
            "no Redis answers at REDIS_URL and redis-server is not installed: "
            "install it (apt-get install redis-server, brew install redis) or set REDIS_URL"
        )
    port = parts.port or 6379
    data_dir = (var_dir / "redis").resolve()  # schedules, sources, dead letters survive Ctrl-C
    data_dir.mkdir(parents=True, exist_ok=True)
    with (var_dir / "redis.log").open("ab") as logfile:
        process = await asyncio.create_subprocess_exec(
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--dir", str(data_dir),
            stdout=logfile, stderr=logfile, start_new_session=True,
        )  # fmt: skip
    async with _child(process, "redis-server"):
        if not await _wait_until(lambda: redis_answers(settings.redis_url), timeout=10):
            raise DevStackError(f"redis-server did not start; see {var_dir / 'redis.log'}")
        log.info(
            "started redis-server on 127.0.0.1:%d (pid %d), its data in %s",
            port, process.pid, data_dir,
        )  # fmt: skip
        yield settings


@contextlib.asynccontextmanager
async def local_mail_sink(settings: Settings, var_dir: Path) -> AsyncIterator[Settings]:
    if settings.smtp_host:
        log.info("sending mail through %s:%d", settings.smtp_host, settings.smtp_port)
        yield settings
        return
    folder = (settings.mail_sink_dir or var_dir / "mail").resolve()
    handler = MaildirHandler(folder)
    try:
        server = await start_smtp_server(handler, "127.0.0.1", DEFAULT_SINK_PORT)
    except OSError:  # port taken: any free port will do, the worker is told which
        server = await start_smtp_server(handler, "127.0.0.1", 0)
    port = server_port(server)
    log.info("mail sink on 127.0.0.1:%d, storing messages in %s", port, folder)
    try:
        yield settings.model_copy(
            update={"smtp_host": "127.0.0.1", "smtp_port": port, "mail_sink_dir": folder}
        )
    finally:
        server.close()
        await server.wait_closed()


@contextlib.asynccontextmanager
async def worker_process(settings: Settings) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {**os.environ, **settings_env(settings)}
    processes = str(process_count(settings))  # the supervisor: one worker per CPU by default
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "worker", "--processes", processes,
        env=env, start_new_session=True,
    )  # fmt: skip
    try:
        yield process
    finally:  # the supervisor gives its workers SHUTDOWN_GRACE, then a margin
        await stop_process(process, "workers", settings.shutdown_grace + STOP_MARGIN_S + 5)


@contextlib.asynccontextmanager
async def web_server(settings: Settings) -> AsyncIterator[web.AppRunner]:
    runner = app_runner(settings)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, settings.web_host, settings.web_port).start()
        except OSError as exc:  # taken since the check: the same one line
            raise DevStackError(_port_taken(settings.web_host, settings.web_port)) from exc
        yield runner
    finally:
        await runner.cleanup()


def check_port_free(host: str, port: int) -> None:
    """DevStackError (one line, not aiohttp's traceback) when the API's port is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as aiohttp binds
        try:
            probe.bind((host, port))
        except OSError:
            raise DevStackError(_port_taken(host, port)) from None


def _port_taken(host: str, port: int) -> str:
    holder = listener_of(port)
    by = f"by {holder}" if holder else "(another `asyncjobs dev`?)"
    return f"{host}:{port} is already in use {by}; stop it or set WEB_PORT to a free port"


def listener_of(port: int) -> str | None:
    """Which process listens on this TCP port ("pid 42: python -m app dev"), from Linux's
    /proc; None elsewhere, or when it is another user's process (its sockets are not ours
    to read)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rpartition(":")[2], 16)
                if local_port == port and fields[3] == "0A":  # LISTEN
                    inodes.add(f"socket:[{fields[9]}]")
    for fd_dir in Path("/proc").glob("[0-9]*/fd") if inodes else ():
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in inodes for fd in fd_dir.iterdir()):
                command = (fd_dir.parent / "cmdline").read_bytes().replace(b"\0", b" ")
                return f"pid {fd_dir.parent.name}: {command.decode(errors='replace').strip()}"
    return None


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings the launcher decided, as environment variables for the worker child."""
    env = {"REDIS_URL": settings.redis_url}
    if settings.smtp_host:
        env |= {"SMTP_HOST": settings.smtp_host, "SMTP_PORT": str(settings.smtp_port)}
    if settings.mail_sink_dir:
        env["MAIL_SINK_DIR"] = str(settings.mail_sink_dir)
    return env


@contextlib.asynccontextmanager
async def _child(process: asyncio.subprocess.Process, name: str) -> AsyncIterator[None]:
    try:
        yield
    finally:
        await stop_process(process, name)


async def stop_process(
    process: asyncio.subprocess.Process, name: str, timeout: float = CHILD_STOP_TIMEOUT_S
) -> None:
    """SIGTERM, then SIGKILL to its whole process group (it leads one: start_new_session) if
    it has not exited in time."""
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        log.warning("%s did not stop in %.0fs; killing it", name, timeout)
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:  # not a group leader: the process alone
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()


async def _wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.1
) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await check():
            return True
        await asyncio.sleep(interval)
    return False


async def worker_ready(settings: Settings) -> bool:
    """A worker has written its health check (arq's key), so jobs enqueued now are taken."""
    redis = connect(settings)
    try:
        return bool(await redis.exists(settings.queue_name + health_check_key_suffix))
    except (RedisError, OSError):
        return False
    finally:
        await redis.aclose(close_connection_pool=True)


def print_banner(settings: Settings) -> None:
    base = f"http://{settings.web_host}:{settings.web_port}"
    key = settings.api_keys[0].get_secret_value()
    auth = f"-H 'Authorization: Bearer {key}'"
    redis = urlsplit(settings.redis_url)
    database = redis.path.lstrip("/") or "0"
    lines = [
        f"asyncjobs dev stack is up: API on {base}, dashboard on {base}/ui",
        f"  API key: {key}",
        f"  Redis:   {redis.hostname}:{redis.port or 6379}, database {database} (REDIS_URL)",
        f"  health:  curl {base}/health",
        f"  email:   curl -X POST {base}/jobs/email {auth} "
        """-d '{"to": "you@example.com", "subject": "Hello", "text": "Hi!"}'""",
    ]
    if settings.mail_sink_dir:
        lines.append(
            f"  mail:    curl {auth} {base}/dev/mail   (files in {settings.mail_sink_dir})"
        )
    lines.append("Press Ctrl-C to stop.")
    print("\n".join(lines), flush=True)
