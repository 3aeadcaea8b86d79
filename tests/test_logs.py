"""The production worker logs JSON lines, and every job's last line carries its id and outcome."""

from __future__ import annotations

import json
from pathlib import Path

from arq.connections import ArqRedis

from app.logs import JsonFormatter
from tests.conftest import TEST_REDIS_URL
from tests.faults.procs import start_worker_process, stop_process
from tests.helpers import ApiClient
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler


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
