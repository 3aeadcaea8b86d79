"""A running newsletter can be aborted: `DELETE` used to answer 409 "already finished" while
its status said in_progress (its job had fanned out; its messages were being sent). Now the
abort stops every message not yet being sent, and its status and progress say so."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from arq.connections import ArqRedis

from app.web import create_app
from asyncjobs.settings import Settings
from tests.conftest import start_worker, stop_worker
from tests.helpers import ApiClient, api_client, wait_for
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler

RECIPIENTS = 60
MAX_JOBS = 10


@pytest.mark.slow
async def test_aborting_a_newsletter_while_it_sends_stops_the_rest(
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    smtp: tuple[RecordingSmtpHandler, int],
) -> None:
    """Messages whose jobs had started may still go (at most WORKER_MAX_JOBS); the rest not."""
    settings = make_settings(worker_max_jobs=MAX_JOBS)
    worker, task = await start_worker(settings)
    try:
        async with api_client(create_app(settings)) as api:
            await abort_while_sending(api, redis, smtp[0])
    finally:
        await stop_worker(worker, task)


async def abort_while_sending(
    api: ApiClient, redis: ArqRedis, handler: RecordingSmtpHandler
) -> None:
    handler.gate.clear()  # every message waits in the server until the test lets it through
    body = {
        "recipients": [f"reader{n}@example.com" for n in range(RECIPIENTS)],
        "subject": "News", "text": "Hello",
    }  # fmt: skip
    newsletter_id = (await (await api.post("/jobs/newsletter", json=body)).json())["job_id"]

    async def sending() -> bool:
        view: dict[str, Any] = await (await api.get(f"/jobs/{newsletter_id}")).json()
        return view["status"] == "in_progress" and view.get("phase") == "sending"

    await wait_for(sending, timeout=15, what="the newsletter to be sending")
    aborted = await api.delete(f"/jobs/{newsletter_id}")
    assert aborted.status == 202, await aborted.text()
    assert (await aborted.json())["status_before"] == "in_progress"
    handler.gate.set()  # the messages already in the server's hands go through

    view = await wait_job(api, newsletter_id, timeout=30)
    assert view["status"] == "aborted", view
    progress = view["progress"]
    assert progress["pending"] == 0
    assert progress["sent"] + progress["failed"] + progress["aborted"] == RECIPIENTS

    async def queue_drained() -> bool:
        return int(await redis.zcard("arq:queue")) == 0

    await wait_for(queue_drained, timeout=15, what="the aborted messages to be skipped")
    final = (await (await api.get(f"/jobs/{newsletter_id}")).json())["progress"]
    # what the server received is what the progress says was sent: at most the messages whose
    # jobs had started when the abort came
    assert len(handler.messages) == final["sent"]
    assert 0 < final["sent"] <= MAX_JOBS
    assert final["aborted"] == RECIPIENTS - final["sent"] - final["failed"]
    again = await api.delete(f"/jobs/{newsletter_id}")
    assert again.status == 409  # it has ended now: aborted
