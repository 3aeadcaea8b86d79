"""/health reflects Redis and the worker heartbeat; Redis down means 503 JSON, quickly."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from arq.connections import ArqRedis
from arq.worker import Worker

from app.web import create_app
from asyncjobs import __version__
from asyncjobs.settings import Settings
from tests.helpers import ApiClient, api_client, free_port, wait_for


async def test_health_degraded_without_worker(api: ApiClient) -> None:
    response = await api.get("/health")
    assert response.status == 200
    body = await response.json()
    assert body == {
        "status": "degraded",
        "redis": "ok",
        "worker": {"alive": False, "heartbeat": None},
        "version": __version__,
    }


async def test_health_ok_with_worker_heartbeat(api: ApiClient, worker: Worker) -> None:
    async def healthy() -> dict[str, Any] | None:
        body = await (await api.get("/health")).json()
        return body if body["status"] == "ok" else None

    body = await wait_for(healthy, what="worker heartbeat")
    assert body["worker"]["alive"] is True
    assert "j_complete=" in body["worker"]["heartbeat"]


async def test_redis_down_gives_503_json_not_a_hang(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    settings = make_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", redis_timeout=1)
    async with api_client(create_app(settings)) as client:
        started = time.monotonic()
        response = await client.post(
            "/jobs/email", json={"to": "a@example.com", "subject": "s", "text": "t"}
        )
        assert response.status == 503
        body = await response.json()
        assert body["error"] == "service_unavailable"
        assert "Redis" in body["message"]

        for path in ("/health", "/jobs/abc"):
            response = await client.get(path)
            assert response.status == 503, path
        health = await (await client.get("/health")).json()
        assert health["redis"] == "unreachable"
        # connection refused answers at once; the bound is the configured timeout, not a hang
        assert time.monotonic() - started < 10
