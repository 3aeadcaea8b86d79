"""Redis restarts mid-batch: the API says 503 while it is down, the worker rides it out."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from app.web import create_app
from asyncjobs.redis import connect
from asyncjobs.settings import Settings
from tests.faults.conftest import (
    delivery_counts,
    job_outcomes,
    post_emails,
    wait_all_finished,
)
from tests.faults.procs import RedisServer, start_worker_process, stop_process
from tests.helpers import ApiClient, api_client, wait_for
from tests.servers import RecordingSmtpHandler

BEFORE, AFTER = 100, 50


@pytest.mark.slow
@pytest.mark.timeout(240)  # past its own waits (15 + 60 + 90 s); the global one is 120 s
async def test_redis_restart_loses_no_accepted_job(
    make_settings: Callable[..., Settings],
    smtp: tuple[RecordingSmtpHandler, int],
    tmp_path: Path,
    fault_report: Callable[[str], None],
) -> None:
    handler, smtp_port = smtp
    handler.data_delay = 0.02
    server = RedisServer(tmp_path)
    await server.start()
    settings = make_settings(redis_url=server.url, redis_timeout=1)
    own_redis = connect(settings)
    worker = await start_worker_process(
        tmp_path / "worker.log", redis_url=server.url, smtp_host="127.0.0.1", smtp_port=smtp_port,
        worker_max_jobs=20, worker_redis_retry_seconds=60,
        # A job whose start the restart cut off stays locked until job_timeout + 10 s (arq's
        # recovery); a short timeout keeps that wait inside the test.
        job_timeout=5,
    )  # fmt: skip
    refused_while_down = 0
    slowest_refusal = 0.0
    try:
        api: ApiClient
        async with api_client(create_app(settings)) as api:
            accepted = await post_emails(api, BEFORE, "before")

            async def some_sent() -> bool:
                return len(handler.messages) >= 30

            await wait_for(some_sent, timeout=60, what="30 messages before the restart")
            await server.stop()
            for i in range(5):
                started = time.monotonic()
                body = {"to": f"down{i}@example.com", "subject": "s", "text": "t"}
                response = await api.post("/jobs/email", json=body)
                slowest_refusal = max(slowest_refusal, time.monotonic() - started)
                assert response.status == 503, await response.text()
                assert (await response.json())["error"] == "service_unavailable"
                refused_while_down += 1
            health = await api.get("/health")
            assert health.status == 503

            await server.start()  # same port, same append-only file
            accepted += await post_emails(api, AFTER, "after")
            job_ids = [a["job_id"] for a in accepted]
            views = await wait_all_finished(own_redis, job_ids, timeout=90)
    finally:
        await stop_process(worker)
        await own_redis.aclose(close_connection_pool=True)
        await server.stop()

    completed, rerun = job_outcomes(views)
    _, lost, duplicates = delivery_counts(handler, accepted)
    fault_report(
        f"Redis restart: enqueued={len(accepted)} completed={completed} lost={lost} "
        f"duplicates={duplicates} (re-run: {rerun}; refused with 503 while down: "
        f"{refused_while_down}, slowest refusal {slowest_refusal * 1000:.0f} ms)"
    )
    assert worker.returncode in (None, -9), "the worker died with Redis instead of waiting"
    assert completed == len(accepted) == BEFORE + AFTER
    assert (lost, duplicates) == (0, 0)
    assert slowest_refusal < 5
