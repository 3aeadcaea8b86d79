"""Connections to Redis, the broker, shared by the web app, the worker and the dev launcher."""

from __future__ import annotations

from arq.connections import ArqRedis, RedisSettings
from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import RedisError

from app.settings import Settings


def redis_settings(settings: Settings) -> RedisSettings:
    """arq's RedisSettings for the worker, with our timeout applied."""
    rs = RedisSettings.from_dsn(settings.redis_url)
    rs.conn_timeout = settings.redis_timeout  # type: ignore[assignment]  # arq types it int
    return rs


def connect(settings: Settings) -> ArqRedis:
    """A lazily connecting client: it never blocks longer than `redis_timeout` per call."""
    pool = ConnectionPool.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_timeout,
        socket_timeout=settings.redis_timeout,
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
