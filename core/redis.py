"""Connections to Redis, the broker, shared by the web app, the worker and the dev launcher."""

from __future__ import annotations

import math

from arq.connections import ArqRedis, RedisSettings
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from core.settings import Settings
from core.speedups import redis_pool_options


def redis_settings(settings: Settings) -> RedisSettings:
    """arq's RedisSettings for the worker: our timeout, and retries that outlast a Redis restart.

    Without retries a worker dies on the first failed command while Redis restarts; with them its
    commands wait (backing off up to 1 s between tries) for `worker_redis_retry_seconds`.
    """
    rs = RedisSettings.from_dsn(settings.redis_url)
    rs.conn_timeout = settings.redis_timeout  # type: ignore[assignment]  # arq types it int
    backoff_cap = 1.0
    retries = math.ceil(settings.worker_redis_retry_seconds / backoff_cap) + 7  # 7 short ones
    rs.retry = Retry(ExponentialBackoff(cap=backoff_cap, base=0.01), retries)
    rs.retry_on_error = [RedisConnectionError, RedisTimeoutError, OSError]
    return rs


def connect(settings: Settings) -> ArqRedis:
    """A lazily connecting client: it never blocks longer than `redis_timeout` per call."""
    pool = ConnectionPool.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout,
        # one immediate reconnect: a pooled connection may be stale after a Redis restart
        retry=Retry(NoBackoff(), 1),
        retry_on_error=[RedisConnectionError],
        **redis_pool_options(),
    )
    return ArqRedis(pool, default_queue_name=settings.queue_name)


async def redis_answers(url: str, timeout: float = 1.0) -> bool:
    client: Redis = Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(await client.ping())
    except (RedisError, OSError):
        return False
    finally:
        await client.aclose()
