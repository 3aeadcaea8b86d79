"""Real processes for fault tests: arq workers run the production way, a restartable Redis."""

from __future__ import annotations

import asyncio
import os
import sys
from asyncio.subprocess import STDOUT
from pathlib import Path
from typing import Any

from core.redis import redis_answers
from tests.helpers import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]


def service_env(**settings: Any) -> dict[str, str]:
    """The environment of a child process: ours without service settings, plus `settings`."""
    prefixes = ("SMTP_", "MAIL_", "REDIS_", "SCRAPE_", "JOB_", "WORKER_", "SHUTDOWN_", "EMAIL_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env["PYTHONPATH"] = str(REPO)
    env |= {name.upper(): str(value) for name, value in settings.items()}
    return env


async def start_worker_process(log: Path, **settings: Any) -> asyncio.subprocess.Process:
    """`arq worker_settings.WorkerSettings`, exactly as production runs it."""
    command = [sys.executable, "-m", "arq", "worker_settings.WorkerSettings"]
    return await asyncio.create_subprocess_exec(
        *command, cwd=REPO, env=service_env(**settings), stdout=log.open("ab"), stderr=STDOUT
    )


class RedisServer:
    """A redis-server of the test's own, with an append-only file so a restart keeps the data."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--appendonly", "yes", "--save", "", "--dir", str(self.folder),
            stdout=(self.folder / "redis.log").open("ab"), stderr=STDOUT,
        )  # fmt: skip

        async def up() -> bool:
            return await redis_answers(self.url, timeout=0.5)

        await wait_for(up, timeout=15, what="the test redis-server")

    async def stop(self) -> None:
        """SIGTERM: Redis flushes its append-only file and exits."""
        if self.process and self.process.returncode is None:
            self.process.terminate()
            await asyncio.wait_for(self.process.wait(), 15)


async def stop_process(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
        await process.wait()
