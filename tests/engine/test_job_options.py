"""Job options on every POST /jobs/*: delayed jobs (run_at, delay_seconds) and priorities,
with a real worker and real Redis; bad options are 422s naming the field."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, cast

import pytest
from arq.connections import ArqRedis
from arq.jobs import Job
from arq.typing import WorkerCoroutine
from arq.worker import Retry, func

from asyncjobs.settings import Settings
from jobs.engine.queue import BULK_SHARE_EVERY, enqueue_job, enqueue_jobs
from tests.conftest import AUTH, start_worker, stop_worker
from tests.helpers import ApiClient, wait_for
from tests.servers import RecordingSmtpHandler, SiteStats

EMAIL = {"to": "someone@example.com", "subject": "Hi", "text": "Hello"}


async def finished_info(redis: ArqRedis, job_id: str, timeout: float = 15) -> Any:
    job = Job(job_id, redis)

    async def done() -> Any:
        return await job.result_info()

    return await wait_for(done, timeout=timeout, what=f"job {job_id} to finish")


@pytest.mark.slow
async def test_a_delayed_job_is_deferred_then_starts_on_time_not_before(
    api: ApiClient,
    redis: ArqRedis,
    worker: Any,
    site: tuple[str, SiteStats],
    fault_report: Callable[[str], None],
) -> None:
    base, stats = site
    response = await api.post(
        "/jobs/scrape", json={"url": f"{base}/page/1", "delay_seconds": 2}, headers=AUTH
    )
    assert response.status == 202, await response.text()
    job_id = (await response.json())["job_id"]
    view = await (await api.get(f"/jobs/{job_id}", headers=AUTH)).json()
    assert view["status"] == "deferred"
    assert stats.hits.get("/page/1", 0) == 0
    info = await finished_info(redis, job_id)
    due_ms = info.enqueue_time.timestamp() * 1000 + 2000
    late_ms = info.start_time.timestamp() * 1000 - due_ms
    fault_report(f"delay_seconds=2: started {late_ms:.0f} ms after it was due")
    assert 0 <= late_ms < 100, f"started {late_ms:.0f} ms after it was due"
    assert info.success and stats.hits["/page/1"] == 1


async def test_run_at_sets_when_the_job_is_due(
    api: ApiClient, redis: ArqRedis, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    """No worker: the job waits, deferred, with `due_at` the time asked for."""
    run_at = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    body = {**EMAIL, "run_at": run_at.astimezone(timezone(timedelta(hours=5))).isoformat()}
    response = await api.post("/jobs/email", json=body, headers=AUTH)
    assert response.status == 202, await response.text()
    view = await (await api.get(f"/jobs/{(await response.json())['job_id']}", headers=AUTH)).json()
    assert view["status"] == "deferred"
    due = datetime.fromisoformat(view["due_at"])
    assert abs((due - run_at).total_seconds()) < 1


async def test_a_deferred_job_can_be_aborted_and_never_runs(
    api: ApiClient, redis: ArqRedis, worker: Any, site: tuple[str, SiteStats]
) -> None:
    base, stats = site
    body = {"url": f"{base}/page/7", "delay_seconds": 3600}
    job_id = (await (await api.post("/jobs/scrape", json=body, headers=AUTH)).json())["job_id"]
    aborted = await api.delete(f"/jobs/{job_id}", headers=AUTH)
    assert aborted.status == 202
    assert (await aborted.json())["status_before"] == "deferred"

    async def status() -> str | None:
        view = await (await api.get(f"/jobs/{job_id}", headers=AUTH)).json()
        return cast(str, view["status"]) if view["status"] == "aborted" else None

    await wait_for(status, what="the deferred job to be aborted")
    assert stats.hits.get("/page/7", 0) == 0


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"delay_seconds": -1}, "delay_seconds"),
        ({"delay_seconds": 10**9}, "delay_seconds"),
        ({"run_at": "2030-01-01T00:00:00"}, "run_at"),  # no zone
        ({"run_at": "2001-01-01T00:00:00Z"}, "run_at"),  # in the past
        ({"run_at": "3000-01-01T00:00:00Z"}, "run_at"),  # beyond MAX_DELAY_SECONDS
        ({"priority": "urgent"}, "priority"),
        ({"callback_url": "ftp://example.com/"}, "callback_url"),
        ({"callback_url": "https://example.com/hook"}, "callback_url"),  # no WEBHOOK_SECRET
    ],
)
async def test_bad_options_are_422_naming_the_field(
    api: ApiClient, redis: ArqRedis, extra: dict[str, Any], field: str
) -> None:
    for path, body in [("/jobs/email", EMAIL), ("/jobs/report", {})]:
        response = await api.post(path, json={**body, **extra}, headers=AUTH)
        assert response.status == 422, (path, await response.text())
        details = (await response.json())["details"]
        assert [d["field"] for d in details] == [field], details


async def test_run_at_and_delay_together_are_refused(api: ApiClient, redis: ArqRedis) -> None:
    run_at = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    body = {**EMAIL, "delay_seconds": 5, "run_at": run_at}
    response = await api.post("/jobs/email", json=body, headers=AUTH)
    assert response.status == 422
    assert "at most one of 'run_at' or 'delay_seconds'" in await response.text()


async def test_a_report_takes_only_job_options(api: ApiClient, redis: ArqRedis) -> None:
    response = await api.post("/jobs/report", json={"format": "csv"}, headers=AUTH)
    assert response.status == 422
    assert "format" in await response.text()
    assert (await api.post("/jobs/report", headers=AUTH)).status == 202  # no body at all


async def test_a_transactional_email_overtakes_5000_bulk_ones(
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    api: ApiClient,
    smtp: tuple[RecordingSmtpHandler, int],
    fault_report: Callable[[str], None],
) -> None:
    """5,000 bulk emails queued before the worker starts (10 at a time); an email sent through
    the API after them is delivered within the next free slots, not after the backlog, and
    the bulk ones keep going meanwhile."""
    handler, _ = smtp
    max_jobs = 10
    bulk = [
        {"email": {**EMAIL, "to": [f"bulk{n}@example.com"]}, "message_id": f"<bulk{n}@test>"}
        for n in range(5000)
    ]
    ids = await enqueue_jobs(redis, "send_email", bulk)
    assert all(ids)
    worker, task = await start_worker(make_settings(), max_jobs=max_jobs, cron_jobs=[])
    try:
        await wait_for(lambda: _at_least(handler, 100), what="the bulk emails to start going")
        sent_before = len(handler.messages)
        body = {**EMAIL, "to": "urgent@example.com"}
        enqueued = time.monotonic()
        response = await api.post("/jobs/email", json=body, headers=AUTH)
        assert response.status == 202

        async def urgent_position() -> int | None:
            for position, message in enumerate(handler.messages):
                if "urgent@example.com" in message.rcpt_tos:
                    return position + 1  # 0 would read as "not yet"
            return None

        position = await wait_for(urgent_position, what="the transactional email") - 1
        overtaken_by = position - sent_before
        fault_report(
            f"priority: a transactional email sent after 5,000 bulk ones (worker max_jobs "
            f"{max_jobs}) was delivered {(time.monotonic() - enqueued) * 1000:.0f} ms after its "
            f"202, overtaken by {overtaken_by} bulk messages ({5000 - sent_before} still queued)"
        )
        # already running or claimed when it arrived: at most a worker's slots twice over
        assert overtaken_by <= 2 * max_jobs, overtaken_by
        assert 5000 - sent_before > 1000  # the backlog was far from done
        progressed = len(handler.messages)
        await wait_for(lambda: _at_least(handler, progressed + 50), what="bulk to keep going")
    finally:
        await stop_worker(worker, task)


async def _at_least(handler: RecordingSmtpHandler, count: int) -> bool:
    return len(handler.messages) >= count


STARTED: list[str] = []


async def record_start(ctx: dict[str, Any], kind: str) -> None:
    STARTED.append(kind)


async def test_bulk_keeps_its_share_while_transactional_jobs_wait(
    settings: Settings, redis: ArqRedis
) -> None:
    """300 of each class waiting, one slot: every BULK_SHARE_EVERY-th claim is a bulk job."""
    STARTED.clear()
    for kind in ("bulk", "transactional"):
        calls = [{"kind": kind, "_priority": kind} for _ in range(300)]
        assert all(await enqueue_jobs(redis, "record_start", calls))
    functions = [func(cast(WorkerCoroutine, record_start), name="record_start")]
    worker, task = await start_worker(settings, functions=functions, max_jobs=1, cron_jobs=[])
    try:
        await wait_for(lambda: _started(200), what="200 jobs to start")
    finally:
        await stop_worker(worker, task)
    first = STARTED[:200]
    assert first.count("bulk") == 200 // BULK_SHARE_EVERY, first


async def _started(count: int) -> bool:
    return len(STARTED) >= count


async def test_a_transactional_retry_is_not_lost_behind_its_old_hint(
    settings: Settings, redis: ArqRedis
) -> None:
    """A transactional job put back for a retry at once is claimed again at once, although
    its priority hint still pointed at the end of its first lease."""
    attempts: list[int] = []

    async def fail_once(ctx: dict[str, Any]) -> str:
        attempts.append(ctx["job_try"])  # a plain arq function: arq's ctx dict
        if ctx["job_try"] == 1:
            raise Retry(defer=0)
        return "ok"

    functions = [func(cast(WorkerCoroutine, fail_once), name="fail_once")]
    worker, task = await start_worker(settings, functions=functions, cron_jobs=[])
    try:
        job_id = await enqueue_job(redis, "fail_once", _priority="transactional")
        assert job_id is not None
        info = await finished_info(redis, job_id, timeout=5)  # a lease is 15 s
        assert info.success and attempts == [1, 2]
    finally:
        await stop_worker(worker, task)
