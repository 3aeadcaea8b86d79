"""A 503 must be safe to act on: with REDIS_WAIT_REPLICAS and no replica, a job is enqueued on
the primary but not confirmed, and the API answers 503. Retrying with the same Idempotency-Key
finds that job (its id, and an email's Message-ID, are derived from the key) instead of
enqueueing a second; without a key every retry would add one. It used to be: the key was
deleted with the 503, and a retry sent a second email with a new Message-ID."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from arq.connections import ArqRedis

from app.web import create_app
from asyncjobs import JobContext, job
from asyncjobs.keys import COUNTERS_KEY
from asyncjobs.registry import unregister
from asyncjobs.settings import Settings
from tests.conftest import start_worker, stop_worker
from tests.helpers import ApiClient, api_client
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler


async def count_sheep(ctx: JobContext, sheep: int) -> int:
    return sheep


@pytest.fixture
async def unconfirmed_api(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> AsyncIterator[ApiClient]:
    """The API over a Redis with no replica, asked to wait for one (50 ms)."""
    job(name="count_sheep")(count_sheep)  # declared for this test only
    settings = make_settings(redis_wait_replicas=1, redis_wait_timeout_ms=50)
    try:
        async with api_client(create_app(settings)) as client:
            yield client
    finally:
        unregister("count_sheep")


async def enqueued(redis: ArqRedis) -> int:
    count = await redis.hget(COUNTERS_KEY, "enqueued|count_sheep")  # type: ignore[misc]
    return int(count or 0)


async def test_a_503_retried_with_its_key_enqueues_once(
    unconfirmed_api: ApiClient, redis: ArqRedis
) -> None:
    headers = {"Idempotency-Key": "sheep-1"}
    statuses = []
    for _ in range(3):
        response = await unconfirmed_api.post(
            "/jobs/count_sheep", json={"sheep": 3}, headers=headers
        )
        statuses.append(response.status)
        assert "Idempotency-Key" in (await response.json())["message"]
    assert statuses == [503, 503, 503]
    assert await enqueued(redis) == 1  # on the primary once, whatever the retries
    queued = [k.decode() for k in await redis.zrange("arq:queue", 0, -1)]
    assert len(queued) == 1 and re.fullmatch("[0-9a-f]{32}", queued[0])  # the key's job id


async def test_without_a_key_each_retry_is_another_job(
    unconfirmed_api: ApiClient, redis: ArqRedis
) -> None:
    for _ in range(3):
        response = await unconfirmed_api.post("/jobs/count_sheep", json={"sheep": 3})
        assert response.status == 503
    assert await enqueued(redis) == 3  # why the client always sends a key


ORDER_EMAIL = {"to": ["ada@example.com", "bob@example.com"], "subject": "Order", "text": "x"}
NEWSLETTER = {"recipients": ["a@example.com", "b@example.com"], "subject": "N", "text": "t"}


async def test_a_503_email_retried_with_its_key_is_delivered_once_with_one_message_id(
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    smtp: tuple[RecordingSmtpHandler, int],
) -> None:
    """Two 503s while the replicas lag, then the failover is over (the same Redis, no WAIT):
    the third try answers the first try's job and Message-ID, and one message is delivered."""
    headers = {"Idempotency-Key": "order-42-confirmation"}
    unconfirmed = make_settings(redis_wait_replicas=1, redis_wait_timeout_ms=50)
    async with api_client(create_app(unconfirmed)) as client:
        for _ in range(2):
            response = await client.post("/jobs/email", json=ORDER_EMAIL, headers=headers)
            assert response.status == 503
    settings = make_settings()
    async with api_client(create_app(settings)) as client:
        response = await client.post("/jobs/email", json=ORDER_EMAIL, headers=headers)
        assert response.status == 202, await response.text()
        accepted = await response.json()
        queued = [k.decode() for k in await redis.zrange("arq:queue", 0, -1)]
        assert queued == [accepted["job_id"]]
        worker, task = await start_worker(settings, cron_jobs=[])
        try:
            status = await wait_job(client, accepted["job_id"])
            assert status["status"] == "complete", status
        finally:
            await stop_worker(worker, task)
    handler, _ = smtp
    assert len(handler.messages) == 1
    assert handler.messages[0].message["Message-ID"] == accepted["message_id"]


@pytest.mark.parametrize(
    ("path", "body", "ids"),
    [
        ("/jobs/newsletter", NEWSLETTER, lambda a: [a["job_id"]]),
        ("/jobs/scrape", {"urls": ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"]},
         lambda a: [j["job_id"] for j in a["jobs"]]),
        ("/jobs/export", {"format": "csv"}, lambda a: [a["job_id"]]),
        ("/jobs/report", {}, lambda a: [a["job_id"]]),
    ],
)  # fmt: skip
@pytest.mark.slow
async def test_every_built_in_retried_after_a_503_answers_the_first_tries_jobs(
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    path: str,
    body: dict[str, Any],
    ids: Callable[[dict[str, Any]], list[str]],
) -> None:
    headers = {"Idempotency-Key": f"retry-{path}"}
    unconfirmed = make_settings(redis_wait_replicas=1, redis_wait_timeout_ms=50)
    async with api_client(create_app(unconfirmed)) as client:
        for _ in range(2):
            assert (await client.post(path, json=body, headers=headers)).status == 503
    queued_after_503s = sorted(k.decode() for k in await redis.zrange("arq:queue", 0, -1))
    async with api_client(create_app(make_settings())) as client:
        response = await client.post(path, json=body, headers=headers)
        assert response.status == 202, await response.text()
        assert sorted(ids(await response.json())) == queued_after_503s
        replay = await client.post(path, json=body, headers=headers)
        assert replay.headers.get("Idempotent-Replayed") == "true"
    assert sorted(k.decode() for k in await redis.zrange("arq:queue", 0, -1)) == queued_after_503s


async def test_a_retry_while_the_first_try_is_unknown_never_gets_a_409_forever(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    """A request refused with a 4xx frees its key for a corrected request; one that failed
    with an unknown outcome keeps it for the same request only."""
    headers = {"Idempotency-Key": "k-1"}
    async with api_client(create_app(make_settings())) as client:
        bad = await client.post("/jobs/email", json={"to": "x"}, headers=headers)
        assert bad.status == 422
        fixed = await client.post("/jobs/email", json=ORDER_EMAIL, headers=headers)
        assert fixed.status == 202
    unconfirmed = make_settings(redis_wait_replicas=1, redis_wait_timeout_ms=50)
    async with api_client(create_app(unconfirmed)) as client:
        other = {"Idempotency-Key": "k-2"}
        assert (await client.post("/jobs/email", json=ORDER_EMAIL, headers=other)).status == 503
        changed = await client.post("/jobs/email", json=NEWSLETTER, headers=other)
        assert changed.status == 422  # another request with a key whose outcome is unknown
    assert await redis.zcard("arq:queue") == 2  # k-1's email, and k-2's first try's
