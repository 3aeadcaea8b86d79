"""Shared pieces of the fault tests."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from arq.connections import ArqRedis

from app.jobstatus import read_job
from app.schemas import JobView
from tests.conftest import TEST_REDIS_URL
from tests.helpers import ApiClient, wait_for
from tests.servers import RecordingSmtpHandler

FINISHED = {"complete", "failed", "aborted"}


async def post_emails(api: ApiClient, count: int, tag: str) -> list[dict[str, Any]]:
    """POST `count` emails; return the 202 bodies (job_id, message_id, ...)."""

    async def post(i: int) -> dict[str, Any]:
        body = {"to": f"{tag}{i}@example.com", "subject": f"{tag} {i}", "text": "t"}
        response = await api.post("/jobs/email", json=body)
        assert response.status == 202, await response.text()
        accepted: dict[str, Any] = await response.json()
        return accepted

    accepted: list[dict[str, Any]] = []
    for start in range(0, count, 50):  # a few at a time: the API is not under test here
        accepted += await asyncio.gather(*(post(i) for i in range(start, min(count, start + 50))))
    return accepted


async def job_views(redis: ArqRedis, job_ids: list[str]) -> list[JobView]:
    return list(await asyncio.gather(*(read_job(redis, j, "arq:queue") for j in job_ids)))


async def wait_all_finished(
    redis: ArqRedis, job_ids: list[str], timeout: float = 90
) -> list[JobView]:
    async def finished() -> list[JobView] | None:
        views = await job_views(redis, job_ids)
        return views if all(v.status in FINISHED for v in views) else None

    return await wait_for(finished, timeout=timeout, interval=0.25, what="all jobs to finish")


def job_outcomes(views: list[JobView]) -> tuple[int, int]:
    """(jobs complete, jobs that ran more than once) among `views`."""
    completed = sum(v.status == "complete" for v in views)
    return completed, sum((v.tries or 0) > 1 for v in views)


def delivery_counts(
    handler: RecordingSmtpHandler, accepted: list[dict[str, Any]]
) -> tuple[int, int, int]:
    """(delivered distinct, lost, duplicate deliveries) of the accepted messages."""
    expected = {a["message_id"] for a in accepted}
    seen = Counter(handler.message_ids())
    delivered = len(expected & set(seen))
    duplicates = sum(n - 1 for n in seen.values() if n > 1)
    return delivered, len(expected) - delivered, duplicates


def sink_worker_env(smtp_port: int, **extra: object) -> dict[str, object]:
    """Settings for a worker process that uses the test Redis and the loopback SMTP sink."""
    return {"redis_url": TEST_REDIS_URL, "smtp_host": "127.0.0.1", "smtp_port": smtp_port} | extra


async def wait_in_data(handler: RecordingSmtpHandler, count: int, timeout: float = 30) -> None:
    """Until `count` messages sit inside the sink's (delayed) DATA phase."""

    async def reached() -> bool:
        return handler.in_data >= count

    await wait_for(reached, timeout=timeout, what=f"{count} messages inside SMTP DATA")
