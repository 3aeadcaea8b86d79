"""The processes a bench run starts on loopback: its own Redis, the HTTP site, the SMTP sink, and
the Celery venv the Celery engines run from.

Everything is a child process of the bench: a Redis of its own so that `INFO commandstats` counts
only the engine under test (others run test suites against 127.0.0.1:6379 meanwhile), and servers
in their own processes so that serving does not compete with the bench in one event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from redis.asyncio import Redis
from redis.exceptions import RedisError

from asyncjobs.settings import Settings
from bench.procstat import process_tree

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache"
CELERY_VENV = CACHE / "celery-venv"
PR_SET_PDEATHSIG = 1
CELERY_REQUIREMENTS = ("celery[redis]>=5.4,<6", "requests", "selectolax", "psutil")


class BenchError(Exception):
    """Something the bench needs could not be set up; the message says what and why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(**settings: object) -> dict[str, str]:
    """Our environment without any of the project's settings, plus `settings` (upper-cased)."""
    names = {name.upper() for name in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in names and k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(REPO)
    env |= {name.upper(): str(value) for name, value in settings.items()}
    return env


async def wait_until(check: Any, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll the async `check()` until it is truthy; BenchError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


def die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the bench dies, however it dies (Linux prctl
    PR_SET_PDEATHSIG), so that a killed bench leaves no Redis, server or worker behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class ChildProcess:
    """A process of the bench's, in a session of its own so that its children stop with it."""

    def __init__(self, name: str, command: list[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log
        self._log_start = log.stat().st_size if log.exists() else 0
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                command, env=env, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.popen.pid

    def exited(self) -> int | None:
        return self.popen.poll()

    def log_text(self) -> str:
        """What this process wrote to its log (the file may hold earlier runs' lines)."""
        try:
            with self.log.open("rb") as log:
                log.seek(self._log_start)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    async def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, then SIGKILL for the whole process group after `grace` seconds."""
        if self.popen.poll() is not None:
            return
        tree = process_tree(self.popen.pid)
        # SIGTERM to the whole group, as systemd or `docker stop` do: prefork children too
        os.killpg(self.popen.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(self.popen.wait, grace)
            # Exited in time; a child it left behind (still in its group) is killed alone.
            for pid in tree[1:]:
                with contextlib.suppress(OSError):
                    if os.getpgid(pid) == self.popen.pid:
                        os.kill(pid, signal.SIGKILL)
            return
        os.killpg(self.popen.pid, signal.SIGKILL)  # not yet reaped, so the group is still ours
        await asyncio.to_thread(self.popen.wait)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


class RedisServer:
    """A redis-server of the bench's own: no persistence, a free port, commandstats to itself."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(folder),
        ]  # fmt: skip
        self.process = ChildProcess("redis", command, folder / "redis.log", dict(os.environ))
        self.client: Redis = Redis.from_url(self.url)

    async def started(self) -> None:
        async def up() -> bool:
            try:
                return bool(await self.client.ping())
            except (RedisError, OSError):
                return False

        await wait_until(up, 15, "the bench's redis-server")

    async def reset(self) -> None:
        """Between engine runs: no data, no counts."""
        await self.client.flushall()
        await self.client.config_resetstat()

    async def command_calls(self) -> dict[str, int]:
        """Calls per command since the last reset, without the bench's own INFO and CONFIG."""
        stats = await self.client.info("commandstats")
        calls = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
        return {n: c for n, c in calls.items() if n != "info" and not n.startswith("config")}

    async def stop(self) -> None:
        await self.client.aclose()
        await self.process.stop()


class Site:
    """The 50 ms HTML site (bench/site.py) in its own process."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = python_module("bench.site", "--port", str(self.port))
        self.process = ChildProcess("site", command, folder / "site.log", child_env())

    async def _get(self, method: str, path: str) -> dict[str, int]:
        async with aiohttp.ClientSession() as http, http.request(method, self.url + path) as r:
            data: dict[str, int] = await r.json()
            return data

    async def started(self) -> None:
        await wait_until(lambda: _answers(self._get("GET", "/_stats")), 30, "the bench site")

    async def stats(self) -> dict[str, int]:
        """{"pages": served, "max_in_flight": most requests at once} since the last reset."""
        return await self._get("GET", "/_stats")

    async def reset(self) -> None:
        await self._get("POST", "/_reset")


class Sink:
    """The counting SMTP sink (bench/sink.py) in its own process."""

    def __init__(self, folder: Path) -> None:
        self.port, self.control_port = free_port(), free_port()
        command = python_module(
            "bench.sink", "--port", str(self.port), "--control-port", str(self.control_port)
        )
        self.process = ChildProcess("sink", command, folder / "sink.log", child_env())

    async def _call(self, method: str, path: str) -> int:
        url = f"http://127.0.0.1:{self.control_port}{path}"
        async with aiohttp.ClientSession() as http, http.request(method, url) as r:
            return int((await r.json())["count"])

    async def started(self) -> None:
        await wait_until(lambda: _answers(self._call("GET", "/count")), 30, "the SMTP sink")

    async def messages(self) -> int:
        return await self._call("GET", "/count")

    async def reset(self) -> None:
        await self._call("POST", "/reset")


async def _answers(call: Any) -> bool:
    try:
        await call
    except (aiohttp.ClientError, OSError):
        return False
    return True


def celery_python() -> Path:
    """The Celery venv's Python, created on first use and reused (bench/.cache, gitignored)."""
    python = CELERY_VENV / "bin" / "python"
    marker = CELERY_VENV / "bench-requirements.txt"
    wanted = "\n".join(CELERY_REQUIREMENTS) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    print(f"bench: creating the Celery venv in {CELERY_VENV} (once)", file=sys.stderr, flush=True)
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(CELERY_VENV)],
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
         *CELERY_REQUIREMENTS],
    ]  # fmt: skip
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BenchError(f"could not create the Celery venv ({' '.join(step)}): {exc}") from exc
        if done.returncode != 0:
            output = (done.stderr or done.stdout).strip().splitlines()[-15:]
            raise BenchError(
                f"could not create the Celery venv: `{' '.join(step)}` exited "
                f"{done.returncode} (is PyPI reachable?):\n" + "\n".join(output)
            )
    marker.write_text(wanted)
    return python
