"""`python -m app dev` starts the whole stack from nothing, does real work, stops on Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession

from asyncjobs.redis import redis_answers
from tests.conftest import API_KEY, AUTH
from tests.helpers import free_port, wait_for
from tests.servers import SiteStats

REPO = Path(__file__).resolve().parents[2]


async def start_dev(folder: Path, redis_url: str, web_port: int) -> asyncio.subprocess.Process:
    """`python -m app dev` in `folder` (its var/ there), with nothing answering at REDIS_URL
    unless an earlier launcher's Redis still runs."""
    prefixes = ("SMTP_", "MAIL_", "REDIS_", "API_", "SCRAPE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env |= {
        "REDIS_URL": redis_url,
        "WEB_PORT": str(web_port),
        "MAIL_SINK_DIR": str(folder / "mail"),
        "SCRAPE_ALLOWED_CIDRS": "127.0.0.0/8",
        "SCRAPE_ALLOWED_PORTS": "*",
        "API_KEYS": API_KEY,
        "PYTHONPATH": str(REPO),
    }
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "app", "dev", cwd=folder, env=env,
        stdout=(folder / "dev.log").open("ab"), stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


@pytest.fixture
async def dev_stack(
    tmp_path: Path,
) -> AsyncIterator[tuple[str, str, Path, asyncio.subprocess.Process]]:
    redis_url = f"redis://127.0.0.1:{free_port()}/0"  # nothing answers: the launcher starts one
    web_port = free_port()
    process = await start_dev(tmp_path, redis_url, web_port)
    try:
        yield f"http://127.0.0.1:{web_port}", redis_url, tmp_path, process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.slow
@pytest.mark.timeout(210)  # past its own waits (60 + 60 + 30 s); the global one is 120 s
async def test_dev_stack_sends_mail_scrapes_and_stops_cleanly(
    dev_stack: tuple[str, str, Path, asyncio.subprocess.Process], site: tuple[str, SiteStats]
) -> None:
    base, redis_url, tmp_path, process = dev_stack
    log = tmp_path / "dev.log"
    async with ClientSession(headers=AUTH) as http:

        async def healthy() -> bool | None:
            try:
                async with http.get(f"{base}/health") as r:
                    return r.status == 200 and (await r.json())["status"] == "ok"
            except OSError:
                return False

        await wait_for(healthy, timeout=60, interval=0.2, what=f"dev stack health; log: {log}")

        async def banner() -> bool:
            return "dev stack is up" in log.read_text()

        await wait_for(banner, timeout=60, what="the banner")
        text = log.read_text()
        assert f"dashboard on {base}/ui" in text
        redis_port = redis_url.rsplit(":", 1)[1].split("/")[0]
        assert f"Redis:   127.0.0.1:{redis_port}, database 0" in text
        async with http.get(f"{base}/health") as r:  # the banner waits for the worker
            assert (await r.json())["worker"]["alive"] is True

        mail = {"to": "you@example.com", "subject": "Hello from dev", "text": "Hi!"}
        async with http.post(f"{base}/jobs/email", json=mail) as r:
            assert r.status == 202
            message_id = (await r.json())["message_id"]

        async def mail_listed() -> list[dict[str, Any]]:
            async with http.get(f"{base}/dev/mail") as r:
                return [m for m in (await r.json())["messages"] if m["message_id"] == message_id]

        [listed] = await wait_for(mail_listed, what="the message in the mail sink")
        assert listed["subject"] == "Hello from dev"
        assert listed["rcpt_to"] == ["you@example.com"]
        eml = (tmp_path / "mail" / listed["name"]).read_text()
        assert "Subject: Hello from dev" in eml
        async with http.get(f"{base}/dev/mail/{listed['name']}") as r:
            assert r.status == 200 and "Hi!" in await r.text()

        async with http.post(f"{base}/jobs/scrape", json={"url": f"{site[0]}/page/dev"}) as r:
            status_url = base + (await r.json())["status_url"]

        async def scraped() -> dict[str, Any] | None:
            async with http.get(status_url) as r:
                body = await r.json()
                return body if body["status"] == "complete" else None

        body = await wait_for(scraped, what="the scrape job")
        assert body["result"]["title"] == "Test page dev"

    assert await redis_answers(redis_url)
    process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(process.wait(), timeout=30) == 0, log.read_text()
    assert not await redis_answers(redis_url), "the redis-server child outlived the launcher"


@pytest.mark.slow
@pytest.mark.timeout(240)  # past its own waits (60 + 30 + 60 + 30 s); the global one is 120 s
async def test_the_dev_redis_keeps_its_data_across_a_restart(
    dev_stack: tuple[str, str, Path, asyncio.subprocess.Process],
) -> None:
    """The dev stack's Redis had no persistence: every Ctrl-C lost schedules, sources and
    dead letters. Its append-only file is now under var/redis."""
    base, redis_url, tmp_path, process = dev_stack
    schedule = {"every": 3600, "job": {"type": "report"}, "name": "kept"}
    async with ClientSession(headers=AUTH) as http:
        await wait_for(lambda: _up(http, base), timeout=60, what="the dev stack")
        async with http.post(f"{base}/schedules", json=schedule) as response:
            assert response.status == 201, await response.text()
    process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    port = int(base.rsplit(":", 1)[1])
    again = await start_dev(tmp_path, redis_url, port)
    try:
        async with ClientSession(headers=AUTH) as http:
            await wait_for(lambda: _up(http, base), timeout=60, what="the dev stack again")
            async with http.get(f"{base}/schedules") as response:
                names = [s["name"] for s in (await response.json())["schedules"]]
        assert names == ["kept"]
    finally:
        again.send_signal(signal.SIGINT)
        await asyncio.wait_for(again.wait(), timeout=30)
    assert (tmp_path / "var" / "redis").is_dir()


async def _up(http: ClientSession, base: str) -> bool:
    try:
        async with http.get(f"{base}/health") as response:
            return response.status == 200
    except OSError:
        return False


async def test_a_taken_port_is_one_line_and_nothing_is_started(tmp_path: Path) -> None:
    """A second `dev` beside a running one died with a 33-line traceback. Now one line, which
    names the process that holds the port (here the test's own)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        redis_url = f"redis://127.0.0.1:{free_port()}/0"
        process = await start_dev(tmp_path, redis_url, port)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 2
    lines = (tmp_path / "dev.log").read_text().strip().splitlines()
    assert lines[-1].startswith(
        f"error: 127.0.0.1:{port} is already in use by pid {os.getpid()}: "
    ), lines[-1]
    assert lines[-1].endswith("; stop it or set WEB_PORT to a free port")
    assert not any("Traceback" in line for line in lines)
    assert not await redis_answers(redis_url)  # no Redis was started for nothing
