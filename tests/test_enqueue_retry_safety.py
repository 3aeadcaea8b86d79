"""A 503 must be safe to act on: with REDIS_WAIT_REPLICAS and no replica, a user's job is
enqueued on the primary but not confirmed, and the API answers 503. Retrying with the same
Idempotency-Key finds that job (its id is derived from the key) instead of enqueueing a second;
without a key every retry would add one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from arq.connections import ArqRedis

from app.web import create_app
from asyncjobs import JobContext, job
from asyncjobs.keys import COUNTERS_KEY
from asyncjobs.registry import unregister
from asyncjobs.settings import Settings
from tests.helpers import ApiClient, api_client


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
    assert len(queued) == 1 and queued[0].startswith("idem-")  # the id the key stands for


async def test_without_a_key_each_retry_is_another_job(
    unconfirmed_api: ApiClient, redis: ArqRedis
) -> None:
    for _ in range(3):
        response = await unconfirmed_api.post("/jobs/count_sheep", json={"sheep": 3})
        assert response.status == 503
    assert await enqueued(redis) == 3  # why the client always sends a key
