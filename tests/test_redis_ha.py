"""High-availability settings without a cluster: REDIS_SENTINELS parsing, WAIT's 503 when no
replica confirms, and the warning about an eviction policy (the failover itself:
tests/faults/test_sentinel_failover.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
from arq.connections import ArqRedis

from app.web import create_app
from core.redis import eviction_policy_warning, redis_pool
from core.settings import Settings
from tests.conftest import AUTH
from tests.helpers import ApiClient, api_client


def test_sentinels_are_host_port_pairs() -> None:
    settings = Settings(_env_file=None, redis_sentinels="10.0.0.1:26379, sentinel-2:26380")
    assert settings.redis_sentinels == [("10.0.0.1", 26379), ("sentinel-2", 26380)]
    with pytest.raises(ValueError, match="not host:port"):
        Settings(_env_file=None, redis_sentinels="10.0.0.1")


def test_with_sentinels_every_pool_asks_them_for_the_primary() -> None:
    settings = Settings(
        _env_file=None, redis_url="redis://:secret@ignored:1/3",
        redis_sentinels="127.0.0.1:26379", redis_sentinel_master="jobs",
    )  # fmt: skip
    pool = redis_pool(settings)
    assert type(pool).__name__ == "SentinelConnectionPool"
    assert pool.service_name == "jobs"  # type: ignore[attr-defined]
    assert pool.connection_kwargs["db"] == 3 and pool.connection_kwargs["password"] == "secret"


@pytest.fixture
async def waiting_api(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> AsyncIterator[ApiClient]:
    """The API asking for a replica the test Redis does not have."""
    settings = make_settings(redis_wait_replicas=1, redis_wait_timeout_ms=100)
    async with api_client(create_app(settings)) as client:
        yield client


async def test_an_enqueue_no_replica_confirms_is_a_503_that_says_so(
    waiting_api: ApiClient, redis: ArqRedis
) -> None:
    body = {"to": "a@example.com", "subject": "s", "text": "t"}
    response = await waiting_api.post("/jobs/email", json=body, headers=AUTH)
    assert response.status == 503
    message = (await response.json())["message"]
    assert "0 of 1 replicas confirmed the write within 100 ms" in message
    assert "Idempotency-Key" in message
    batch = {"urls": ["https://example.com/a", "https://example.com/b"]}
    assert (await waiting_api.post("/jobs/scrape", json=batch, headers=AUTH)).status == 503


async def test_an_evicting_policy_is_warned_about(redis: ArqRedis) -> None:
    before = (await redis.config_get("maxmemory-policy"))["maxmemory-policy"]
    try:
        await redis.config_set("maxmemory-policy", "volatile-lru")
        warning = await eviction_policy_warning(redis)
        assert warning is not None and "volatile-lru" in warning and "noeviction" in warning
        await redis.config_set("maxmemory-policy", "noeviction")
        assert await eviction_policy_warning(redis) is None
    finally:
        await redis.config_set("maxmemory-policy", before)
