"""Real processes for fault tests: arq workers run the production way, a restartable Redis."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from asyncio.subprocess import STDOUT
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from asyncjobs.redis import redis_answers
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
    """`arq worker_settings.WorkerSettings`, exactly as production runs it; in the log's folder
    (the test's own), where no developer's `.env` is read."""
    command = [sys.executable, "-m", "arq", "worker_settings.WorkerSettings"]
    return await asyncio.create_subprocess_exec(
        *command, cwd=log.parent, env=service_env(**settings), stdout=log.open("ab"), stderr=STDOUT
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


class SentinelCluster:
    """One primary, one replica and three sentinels (Debian's `redis-server --sentinel`), all on
    loopback ports of the test's own; no persistence (a restarted node resyncs from the primary)."""

    MASTER = "mymaster"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ports = {"a": free_port(), "b": free_port()}
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.nodes: dict[str, asyncio.subprocess.Process] = {}
        self.sentinels: list[asyncio.subprocess.Process] = []

    @property
    def sentinels_setting(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    async def start(self) -> None:
        await self.start_node("a")
        await self.start_node("b", replica_of=self.ports["a"])
        for n, port in enumerate(self.sentinel_ports):
            conf = self.folder / f"sentinel-{n}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.folder}\n"
                f"sentinel monitor {self.MASTER} 127.0.0.1 {self.ports['a']} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                f"sentinel failover-timeout {self.MASTER} 10000\n"
            )
            self.sentinels.append(await self._spawn(f"sentinel-{n}", str(conf), "--sentinel"))

        async def ready() -> bool:
            try:
                return await self.replicas_seen() >= 1 and await self.sentinels_agree()
            except (RedisError, OSError):  # a sentinel not listening yet
                return False

        await wait_for(ready, timeout=30, what="sentinels watching a primary and its replica")

    async def start_node(self, name: str, replica_of: int | None = None) -> None:
        args = ["--port", str(self.ports[name]), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.folder)]  # fmt: skip
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.nodes[name] = await self._spawn(name, *args)

        async def up() -> bool:
            return await redis_answers(f"redis://127.0.0.1:{self.ports[name]}/0", timeout=0.5)

        await wait_for(up, timeout=15, what=f"redis node {name}")

    async def _spawn(self, name: str, *args: str) -> asyncio.subprocess.Process:
        log = (self.folder / f"{name}.log").open("ab")
        return await asyncio.create_subprocess_exec(
            "redis-server", *args, stdout=log, stderr=STDOUT
        )

    async def primary_port(self) -> int:
        async with self._sentinel() as client:
            _, port = await client.sentinel_get_master_addr_by_name(self.MASTER)  # type: ignore[no-untyped-call]
        return int(port)

    async def new_primary(self, old: str, timeout: float = 60) -> int:
        """The port of the primary every sentinel names once they promoted a node other than
        `old`."""
        ports: set[int] = set()

        async def promoted() -> bool:
            ports.clear()
            for port in self.sentinel_ports:
                try:
                    async with self._sentinel(port) as client:
                        _, primary = await client.sentinel_get_master_addr_by_name(self.MASTER)  # type: ignore[no-untyped-call]
                except (RedisError, OSError):
                    return False
                ports.add(int(primary))
            return len(ports) == 1 and self.ports[old] not in ports

        await wait_for(promoted, timeout=timeout, interval=0.1, what=f"a primary other than {old}")
        return ports.pop()

    async def replicas_seen(self) -> int:
        """Replicas the first sentinel sees up and linked to the primary."""
        async with self._sentinel() as client:
            replicas = await client.sentinel_slaves(self.MASTER)  # type: ignore[no-untyped-call]
        return sum(1 for r in replicas if not r["is_sdown"] and r.get("master-link-status") == "ok")

    async def sentinels_agree(self) -> bool:
        async with self._sentinel() as client:
            found = await client.sentinel_sentinels(self.MASTER)  # type: ignore[no-untyped-call]
            return len(found) >= 2

    @contextlib.asynccontextmanager
    async def _sentinel(self, port: int | None = None) -> AsyncIterator[Redis]:
        """A client of sentinel `port` (the first one by default)."""
        client = Redis(port=port or self.sentinel_ports[0], socket_timeout=2, decode_responses=True)
        try:
            yield client
        finally:
            await client.aclose()

    def kill(self, name: str) -> None:
        self.nodes[name].kill()

    async def cut_replication(self, name: str) -> None:
        """Drop replica `name`'s link to its primary and keep it down (a wrong `masterauth`
        fails its reconnects), as a network partition does: from then on the primary's writes
        reach only the primary."""
        client = Redis(port=self.ports[name], socket_timeout=5)
        try:
            await client.config_set("masterauth", "a-partition")
            await client.execute_command("CLIENT", "KILL", "TYPE", "master")  # type: ignore[no-untyped-call]
        finally:
            await client.aclose()

    async def stop(self) -> None:
        for process in [*self.sentinels, *self.nodes.values()]:
            if process.returncode is None:
                process.kill()
                await process.wait()
