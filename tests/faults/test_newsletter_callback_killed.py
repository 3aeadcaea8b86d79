"""kill -9 of worker processes mid-newsletter: its callback runs exactly once, with counts that
add up to the recipients (issue 31).

A message's outcome goes in the newsletter's sent / failed / aborted sets and the callback is
released by the same script call when they hold every recipient (jobs/mail/lua/batch_record.lua),
so a kill leaves a message either unrecorded (its job runs again and records it) or recorded;
recorded twice, it is one set member. The callback job counts its own runs in Redis.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis

from app.web import create_app
from asyncjobs import JobContext, job
from asyncjobs.registry import unregister
from asyncjobs.settings import Settings
from tests.faults.conftest import sink_worker_env
from tests.faults.procs import start_worker_process, stop_process
from tests.helpers import ApiClient, api_client, wait_for
from tests.servers import RecordingSmtpHandler

TOTAL = 300
SMTP_CONNECTIONS = 10  # per worker: a kill re-sends at most one message per connection
REFUSED = {"reader7@example.com", "reader150@example.com"}  # 550: failed for good
MODULE = """
import json

from asyncjobs import JobContext, job


@job(tries=1)
async def newsletter_killed_done(ctx: JobContext, batch: dict) -> None:
    await ctx.redis.incr("test:callback-runs")
    await ctx.redis.set("test:callback-batch", json.dumps(batch))
"""


async def newsletter_killed_done(ctx: JobContext, batch: dict[str, Any]) -> None:
    """The API's view of the callback job (it runs in the worker processes: MODULE)."""


@pytest.fixture
def declared() -> Iterator[None]:
    job(name="newsletter_killed_done", tries=1)(newsletter_killed_done)
    try:
        yield None
    finally:
        unregister("newsletter_killed_done")


@pytest.fixture
async def api(declared: None, make_settings: Callable[..., Settings]) -> AsyncIterator[ApiClient]:
    async with api_client(create_app(make_settings())) as client:
        yield client


async def kill_at(
    handler: RecordingSmtpHandler, messages: int, worker: asyncio.subprocess.Process
) -> int:
    """SIGKILL `worker` once the SMTP server has `messages`; how many it had then."""

    async def reached() -> bool:
        return len(handler.messages) >= messages

    await wait_for(reached, timeout=120, interval=0.002, what=f"{messages} messages sent")
    os.kill(worker.pid, signal.SIGKILL)
    await worker.wait()
    return len(handler.messages)


@pytest.mark.timeout(300)
@pytest.mark.slow
async def test_kill_9_mid_newsletter_runs_its_callback_exactly_once(
    api: ApiClient,
    redis: ArqRedis,
    smtp: tuple[RecordingSmtpHandler, int],
    tmp_path: Path,
    fault_report: Callable[[str], None],
) -> None:
    handler, smtp_port = smtp
    handler.data_delay = 0.02  # a real MTA takes a while: kills catch messages in flight
    handler.refuse_rcpt |= REFUSED
    (tmp_path / "nltasks.py").write_text(textwrap.dedent(MODULE))
    env = sink_worker_env(
        smtp_port,
        job_modules="nltasks",
        worker_max_jobs=20,
        smtp_max_connections=SMTP_CONNECTIONS,
        job_lease_seconds=3,  # a killed worker's jobs run again 3 s after the kill
        mail_from="asyncjobs@example.com",
    )
    log = tmp_path / "workers.log"
    body = {
        "recipients": [f"reader{n}@example.com" for n in range(TOTAL)],
        "subject": "News",
        "text": "Hello {{ email }}",
        "callback": {"type": "newsletter_killed_done"},
    }
    response = await api.post("/jobs/newsletter", json=body)
    assert response.status == 202, await response.text()
    accepted = await response.json()
    workers = [await start_worker_process(log, **env) for _ in range(2)]
    kills = []
    try:
        for n, messages in enumerate((1, TOTAL // 3, 2 * TOTAL // 3)):
            victim = workers[n % 2]
            kills.append(await kill_at(handler, messages, victim))
            workers[n % 2] = await start_worker_process(log, **env)

        async def called_back() -> bool:
            return bool(await redis.exists("test:callback-batch"))

        await wait_for(called_back, timeout=120, what=f"the callback; see {log}")
        await asyncio.sleep(4)  # past a lease: a second release would have run it again
        runs = int(await redis.get("test:callback-runs") or 0)
    finally:
        for worker in workers:
            await stop_process(worker)
    batch = json.loads(await redis.get("test:callback-batch"))
    counts = batch["counts"]
    received = {m.rcpt_tos[0] for m in handler.messages}
    duplicates = len(handler.messages) - len(received)
    fault_report(
        f"newsletter callback, kill -9 at {kills} messages: callback runs={runs}, "
        f"counts={counts} of {TOTAL}, {len(handler.messages)} messages received "
        f"({duplicates} duplicates: messages in their final reply at a kill)"
    )
    assert runs == 1
    assert batch["batch_id"] == accepted["job_id"] and batch["total"] == TOTAL
    assert counts == {"sent": TOTAL - len(REFUSED), "failed": len(REFUSED), "aborted": 0}
    assert len(received) == TOTAL - len(REFUSED)
    assert duplicates <= len(kills) * SMTP_CONNECTIONS  # the documented bound (docs/api.md)
    assert kills[-1] < TOTAL - len(REFUSED), "the kills came after the sending: proved nothing"
