"""The production worker logs JSON lines, and every job's last line carries its id and outcome."""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus
from arq.typing import WorkerCoroutine
from arq.worker import func

from asyncjobs.logs import JsonFormatter
from asyncjobs.settings import Settings
from jobs.engine.queue import enqueue_job
from jobs.retry import classified
from tests.conftest import TEST_REDIS_URL, start_worker, stop_worker
from tests.faults.procs import start_worker_process, stop_process
from tests.helpers import ApiClient, wait_for
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler, SiteStats


async def test_worker_logs_are_json_lines_with_the_job_id(
    api: ApiClient, redis: ArqRedis, smtp: tuple[RecordingSmtpHandler, int], tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    worker = await start_worker_process(
        log, redis_url=TEST_REDIS_URL, smtp_host="127.0.0.1", smtp_port=smtp[1], log_format="json"
    )
    try:
        body = {"to": "log@example.com", "subject": "s", "text": "t"}
        job_id = (await (await api.post("/jobs/email", json=body)).json())["job_id"]
        assert (await wait_job(api, job_id))["status"] == "complete"
    finally:
        await stop_process(worker)
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    [finished] = [e for e in entries if e.get("job_id") == job_id and "outcome" in e]
    assert finished["function"] == "send_email"
    assert finished["outcome"] == "completed"
    assert finished["try"] == 1
    assert finished["duration_ms"] >= 0
    # one line per job: what the job did is in its completion line, not in a line of its own
    assert finished["message"].endswith("sent to 1 recipient(s)"), finished
    assert finished["recipients"] == 1 and finished["message_id"].startswith("<"), finished
    about_it = [e for e in entries if finished["message_id"] in e["message"]]
    assert about_it == [finished], about_it


def test_json_formatter_keeps_extras_and_exceptions() -> None:
    import logging

    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("a",), None)
    record.job_id = "abc"
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed a" and entry["job_id"] == "abc"
    assert "ValueError: boom" in entry["exception"]


async def test_an_expected_failure_is_one_warning_line_without_a_traceback(
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    site: tuple[str, SiteStats],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 404 used to write two ERROR lines and a full traceback; it is one WARNING line that
    says why. A bug still gets its traceback, at ERROR."""
    worker, task = await start_worker(make_settings())
    try:
        with caplog.at_level(logging.DEBUG):
            missing = await enqueue_job(redis, "scrape", target={"url": f"{site[0]}/missing"})
            job = Job(str(missing), redis)

            async def failed() -> bool:
                return await job.status() == JobStatus.complete  # arq's word for "finished"

            await wait_for(failed, what="the 404 scrape to end")
    finally:
        await stop_worker(worker, task)
    about_it = [r for r in caplog.records if str(missing) in r.getMessage()]
    loud = [r for r in about_it if r.levelno >= logging.WARNING]
    assert [r.levelname for r in loud] == ["WARNING"], [(r.levelname, r.getMessage()) for r in loud]
    assert "HTTP 404" in loud[0].getMessage()
    assert all(r.exc_info is None for r in about_it)


async def test_an_unexpected_error_keeps_its_traceback(
    make_settings: Callable[..., Settings], redis: ArqRedis, caplog: pytest.LogCaptureFixture
) -> None:
    @classified("maintenance")
    async def broken(ctx: dict[str, Any]) -> None:
        raise ValueError("a bug")

    worker, task = await start_worker(
        make_settings(),
        functions=[func(cast(WorkerCoroutine, broken), name="broken")],
        cron_jobs=[],
    )
    try:
        with caplog.at_level(logging.WARNING):
            job_id = str(await enqueue_job(redis, "broken"))

            async def ended() -> bool:
                return await Job(job_id, redis).status() == JobStatus.complete

            await wait_for(ended, what="the broken job to end")
    finally:
        await stop_worker(worker, task)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and job_id in r.getMessage()]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "ValueError: a bug" in "".join(traceback.format_exception(*errors[0].exc_info))
