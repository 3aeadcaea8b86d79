"""High availability without a whole cluster: REDIS_SENTINELS parsing, WAIT's 503 when no
replica confirms, the warning about an eviction policy, and where a sentinel-managed connection
lands when the sentinels' answer is stale (the failover itself:
tests/faults/test_sentinel_failover.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import ConstantBackoff
from redis.exceptions import ResponseError

from app.web import create_app
from asyncjobs.redis import (
    SentinelPrimaryConnection,
    eviction_policy_warning,
    redis_pool,
    redis_settings,
)
from asyncjobs.settings import Settings
from tests.conftest import AUTH
from tests.faults.procs import SentinelCluster
from tests.helpers import ApiClient, api_client, free_port


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
    assert pool.connection_class is SentinelPrimaryConnection


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


class ScriptedSentinels:
    """The sentinels' answers, in order (the last one repeated): a real sentinel gives a stale
    answer only in a race, and these tests need that answer every time."""

    def __init__(self, *ports: int) -> None:
        self.ports = list(ports)
        self.asked = 0

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        self.asked += 1
        return "127.0.0.1", self.ports[min(self.asked, len(self.ports)) - 1]


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[SentinelCluster]:
    """Two real redis-servers: a primary "a" and its replica "b" (no sentinels)."""
    nodes = SentinelCluster(tmp_path)
    try:
        await nodes.start_node("a")
        await nodes.start_node("b", replica_of=nodes.ports["a"])
        yield nodes
    finally:
        await nodes.stop()


class CountingBackoff(ConstantBackoff):
    """Counts the pauses of retry policies, one per failed attempt (on the class: each
    connection gets a deep copy of its pool's policy)."""

    pauses = 0

    def compute(self, failures: int) -> float:
        CountingBackoff.pauses += 1
        return super().compute(failures)


def client_of(sentinels: ScriptedSentinels, **options: Any) -> Redis:
    CountingBackoff.pauses = 0
    pool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
        "jobs", sentinels, connection_class=SentinelPrimaryConnection, socket_timeout=5,
        retry=Retry(CountingBackoff(0.05), 5),
        retry_on_error=redis_settings(Settings(_env_file=None)).retry_on_error,  # the worker's
        **options,
    )  # fmt: skip
    return Redis(connection_pool=pool)


async def test_each_connect_attempt_asks_the_sentinels_again(pair: SentinelCluster) -> None:
    # the first answer names a primary that was killed: one try there, then ask again
    # (redis-py alone, with the worker's policy, which retries OSError, knocks at that address
    # for the whole policy, 30 s, and lands on whatever answers there by then)
    sentinels = ScriptedSentinels(free_port(), pair.ports["a"])
    client = client_of(sentinels)
    try:
        await client.set("k", "v")
    finally:
        await client.aclose()
    assert (sentinels.asked, CountingBackoff.pauses) == (2, 1)  # one failed try, then ask again
    primary = Redis(port=pair.ports["a"])
    try:
        assert await primary.get("k") == b"v"
    finally:
        await primary.aclose()


async def test_a_replica_named_as_primary_is_refused(pair: SentinelCluster) -> None:
    sentinels = ScriptedSentinels(pair.ports["b"], pair.ports["a"])
    client = client_of(sentinels)
    try:
        # on the replica WAIT is an error ("WAIT cannot be used with replica instances")
        assert await client.execute_command("WAIT", 0, 100) == 0  # type: ignore[no-untyped-call]
        role = await client.execute_command("ROLE")  # type: ignore[no-untyped-call]
        assert role[0] == b"master"
    finally:
        await client.aclose()
    assert sentinels.asked == 2


async def test_a_primary_demoted_under_an_open_connection_is_left(pair: SentinelCluster) -> None:
    a, b = pair.ports["a"], pair.ports["b"]
    sentinels = ScriptedSentinels(a)
    client = client_of(sentinels)
    try:
        await client.ping()  # the connection to "a" is open, and stays in the pool
        # a failover: "b" promoted, "a" made its replica, the sentinels name "b"
        admin_a, admin_b = Redis(port=a), Redis(port=b)
        await admin_b.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]
        await admin_a.execute_command("REPLICAOF", "127.0.0.1", str(b))  # type: ignore[no-untyped-call]
        await admin_a.aclose()
        await admin_b.aclose()
        sentinels.ports.append(b)
        # on "a", now a replica, WAIT is an error: it answers only on the new primary
        acked = await client.execute_command("WAIT", 0, 100)  # type: ignore[no-untyped-call]
        role = await client.execute_command("ROLE")  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()
    assert isinstance(acked, int) and role[0] == b"master", (acked, role)
    assert sentinels.asked == 2


async def test_a_user_the_acl_denies_role_still_connects(pair: SentinelCluster) -> None:
    admin = Redis(port=pair.ports["a"])
    try:
        await admin.acl_setuser(
            "jobs", enabled=True, passwords=["+secret"], keys=["*"], channels=["*"],
            categories=["+@all", "-@admin"],
        )  # fmt: skip
    finally:
        await admin.aclose()
    client = client_of(ScriptedSentinels(pair.ports["a"]), username="jobs", password="secret")
    try:
        assert await client.set("k", "v") and await client.get("k") == b"v"
        with pytest.raises(ResponseError, match="no permissions"):  # ROLE was refused
            await client.execute_command("ROLE")  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()
