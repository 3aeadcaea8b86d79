"""Connections to Redis, the broker, shared by the web app, the worker and the dev launcher."""

from __future__ import annotations

import asyncio
import math
from typing import Any
from urllib.parse import urlsplit

from arq.connections import ArqRedis, RedisSettings
from redis.asyncio import Connection, ConnectionPool, Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import str_if_bytes

from asyncjobs.settings import Settings
from asyncjobs.speedups import redis_pool_options

_ONE_TRY = Retry(NoBackoff(), 0)


class SentinelPrimaryConnection(SentinelManagedConnection):
    """A connection to the primary the sentinels name, asked again on every connect attempt.

    redis-py's connection retries the socket connect to the address it was first given, with
    the pool's whole retry policy (30 s in a worker), before it asks the sentinels again: a
    connection begun while they still named a killed primary kept knocking at it and, when
    that node came back as a replica, landed there (WAIT refused, scripts missing: seen in
    tests/faults/test_sentinel_failover.py). Here each attempt tries the named address once
    (the pool's policy spaces the attempts and asks the sentinels each time), a node that
    does not say ROLE master is refused, and a WAIT refused for being on a replica (the
    primary was demoted under an open connection) drops the connection like a READONLY does.
    """

    async def connect_to(self, address: tuple[str, int]) -> None:
        self.host, self.port = address
        policy, self.retry = self.retry, _ONE_TRY
        try:
            await Connection.connect(self)  # type: ignore[no-untyped-call]
        finally:
            self.retry = policy
        await self.send_command("ROLE")
        try:
            role = str_if_bytes((await self.read_response())[0])
        except ResponseError:  # ROLE is an admin command an ACL may deny: take the sentinels' word
            return
        if role != "master":
            await self.disconnect()
            raise RedisConnectionError(f"{self.host}:{self.port} is a {role}, not the primary")

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except ResponseError as exc:
            if not str(exc).startswith("WAIT cannot be used with replica"):
                raise
            await self.disconnect()
            raise RedisConnectionError("The previous master is now a replica") from exc


def redis_pool(settings: Settings, **options: Any) -> ConnectionPool:
    """The pool behind every client the project makes: REDIS_URL's server, or with
    REDIS_SENTINELS the primary the sentinels name, asked again on every connect attempt (see
    SentinelPrimaryConnection): a failover needs no restart."""
    if not settings.redis_sentinels:
        return ConnectionPool.from_url(settings.redis_url, **options)
    url = urlsplit(settings.redis_url)
    database = int(url.path.strip("/") or 0)
    sentinels = Sentinel(  # type: ignore[no-untyped-call]
        settings.redis_sentinels,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=settings.redis_timeout,
    )
    options["connection_class"] = SentinelPrimaryConnection
    pool: ConnectionPool = SentinelConnectionPool(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master, sentinels,
        db=database, username=url.username, password=url.password, **options,
    )  # fmt: skip
    return pool


def redis_settings(settings: Settings) -> RedisSettings:
    """arq's RedisSettings for the worker: our timeout, and retries that outlast a Redis restart.

    Without retries a worker dies on the first failed command while Redis restarts; with them its
    commands wait (backing off up to 1 s between tries) for `worker_redis_retry_seconds`.
    """
    rs = RedisSettings.from_dsn(settings.redis_url)
    if settings.redis_sentinels:  # arq's own clients (`arq --check`) ask the sentinels too
        rs.host, rs.sentinel = list(settings.redis_sentinels), True
        rs.sentinel_master = settings.redis_sentinel_master
    rs.conn_timeout = settings.redis_timeout  # type: ignore[assignment]  # arq types it int
    backoff_cap = 1.0
    retries = math.ceil(settings.worker_redis_retry_seconds / backoff_cap) + 7  # 7 short ones
    rs.retry = Retry(ExponentialBackoff(cap=backoff_cap, base=0.01), retries)
    rs.retry_on_error = [RedisConnectionError, RedisTimeoutError, OSError]
    return rs


def connect(settings: Settings) -> ArqRedis:
    """A lazily connecting client: it never blocks longer than `redis_timeout` per call."""
    pool = redis_pool(
        settings,
        socket_connect_timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout,
        # one immediate reconnect: a pooled connection may be stale after a Redis restart
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
        **redis_pool_options(settings.redis_url),
    )
    return ArqRedis(pool, default_queue_name=settings.queue_name)


class NotReplicatedError(RedisError):
    """A write reached the primary but not REDIS_WAIT_REPLICAS replicas in time."""


async def execute_replicated(pipe: Pipeline, settings: Settings) -> list[Any]:
    """Execute a pipeline (not a MULTI one) and, with REDIS_WAIT_REPLICAS set, a WAIT after
    its commands: the pipeline runs on one connection, and WAIT covers that connection's
    writes. The commands' replies; NotReplicatedError when fewer replicas confirmed in time
    (the writes are on the primary, and may be lost if it dies before they reach one)."""
    wanted = settings.redis_wait_replicas
    if wanted:
        pipe.execute_command("WAIT", wanted, settings.redis_wait_timeout_ms)
    replies: list[Any] = await pipe.execute()
    if wanted:
        acked = int(replies.pop())
        if acked < wanted:
            raise NotReplicatedError(
                f"{acked} of {wanted} replicas confirmed the write within "
                f"{settings.redis_wait_timeout_ms} ms (REDIS_WAIT_REPLICAS)"
            )
    return replies


async def replicas_ready(redis: Redis, settings: Settings) -> None:
    """With REDIS_WAIT_REPLICAS set, NotReplicatedError unless that many replicas are linked
    and caught up (a WAIT with no write of its own). A job checks it before a side effect it
    cannot take back (sending an email): when the primary cannot replicate, what the job
    writes afterwards (its sent marker) would not survive a failover, and a re-run would do
    the side effect again."""
    wanted = settings.redis_wait_replicas
    if not wanted:
        return
    wait = redis.execute_command("WAIT", wanted, settings.redis_wait_timeout_ms)  # type: ignore[no-untyped-call]
    acked = int(await wait)
    if acked < wanted:
        raise NotReplicatedError(f"{acked} of {wanted} replicas are linked (REDIS_WAIT_REPLICAS)")


async def eviction_policy_warning(redis: Redis) -> str | None:
    """What to warn an operator about when the server may evict keys: job keys have TTLs, so
    every policy but `noeviction` (the `volatile-*` ones included) can drop a queued job when
    memory runs out. None when it cannot (or CONFIG is disabled, as managed Redis often has)."""
    try:
        reply = await redis.config_get("maxmemory-policy")
    except RedisError:
        return None
    policy = reply.get("maxmemory-policy")  # redis-py decodes CONFIG GET's reply itself
    if policy is None or policy == "noeviction":
        return None
    return (
        f"Redis maxmemory-policy is {policy}: when memory runs out it may evict queued jobs; "
        "set maxmemory-policy noeviction (writes are then refused, and enqueues answer 503)"
    )


async def redis_answers(url: str, timeout: float = 1.0) -> bool:
    client: Redis = Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()


# Commands that block, or change their connection's state: sent on a connection of their own.
_ALONE = frozenset({
    "WAIT", "WAITAOF", "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN",
    "BZPOPMAX", "BZMPOP", "XREAD", "XREADGROUP", "SUBSCRIBE", "PSUBSCRIBE", "SSUBSCRIBE",
    "MONITOR", "WATCH", "UNWATCH", "MULTI", "EXEC", "DISCARD", "SELECT", "AUTH", "HELLO",
    "CLIENT", "RESET", "QUIT", "SHUTDOWN",
})  # fmt: skip
MAX_BATCH = 512  # commands per write: keeps one batch's replies from holding the loop long

_Pending = tuple[tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]


class AutoPipelinedRedis(ArqRedis):
    """ArqRedis whose single commands, when many jobs issue them in the same event-loop turn,
    go to Redis together: one write and one connection for the lot, each caller still getting
    its own reply or error as if it had sent its command alone.

    A worker claims jobs in batches, so jobs start together and send their first commands (a
    sent-marker check, a page's stored validators) together: one round trip instead of one
    each; with 100 callers at once, 7 µs of CPU per command instead of 47, and alone 10% more
    (`python -m bench.redisbatch`; behaviour in tests/engine/test_autopipeline.py). Pipelines and
    transactions are unchanged (they have their own class); blocking commands go alone.
    After a lost connection only the commands without a reply are sent again, with the pool's
    retry policy, as a single command would be.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: list[_Pending] = []
        self._sending: set[asyncio.Task[None]] = set()

    @classmethod
    def sharing_pool_of(cls, redis: Redis) -> AutoPipelinedRedis:
        """A client on `redis`'s connection pool (and job serializers, if it is an ArqRedis)."""
        if not isinstance(redis, ArqRedis):
            return cls(redis.connection_pool)
        return cls(
            redis.connection_pool,
            job_serializer=redis.job_serializer,
            job_deserializer=redis.job_deserializer,
            default_queue_name=redis.default_queue_name,
            expires_extra_ms=redis.expires_extra_ms,
        )

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        name = str(args[0]).split(" ", 1)[0].upper()
        if self.connection is not None or name in _ALONE:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)
        self._pending.append((args, options, future))
        return await future

    def _flush(self) -> None:
        # a caller cancelled before its command was written: not sent, as if sent alone
        pending = [command for command in self._pending if not command[2].done()]
        self._pending = []
        for first in range(0, len(pending), MAX_BATCH):
            task = asyncio.ensure_future(self._send(pending[first : first + MAX_BATCH]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        answered: list[int] = [0]  # how many replies were read: a retry sends only the rest
        try:
            await self.initialize()
            conn = await self.connection_pool.get_connection()
            try:
                await conn.retry.call_with_retry(
                    lambda: self._exchange(conn, batch, answered),
                    lambda error: self._disconnect_raise(conn, error),
                )
            finally:
                await self.connection_pool.release(conn)
        except BaseException as exc:  # the connection, or the task cancelled at shutdown
            for _, _, future in batch[answered[0] :]:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:
                    future.cancel()
            if not isinstance(exc, Exception):
                raise

    async def _exchange(self, conn: Any, batch: list[_Pending], answered: list[int]) -> None:
        todo = batch[answered[0] :]
        await conn.send_packed_command(conn.pack_commands([args for args, _, _ in todo]))
        for args, options, future in todo:
            try:
                reply = await self.parse_response(conn, args[0], **dict(options))
            except ResponseError as exc:  # this command's error, not the batch's
                answered[0] += 1
                if not future.done():
                    future.set_exception(exc)
                continue
            answered[0] += 1
            if not future.done():  # its caller may have been cancelled meanwhile
                future.set_result(reply)
