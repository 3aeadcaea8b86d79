"""SIGTERM lets running jobs finish within the grace period; jobs past it are re-run, not lost.
Abort stops a running or queued job for good.

The sink keeps a message it has whole though its client goes away before the 250, as Postfix
and Exim do: a send cut in its final reply (past the grace, or by an abort) has delivered its
message, and a re-run sends it again, as after a crash (docs/operations.md, "Delivery
guarantees": at most one message per SMTP connection)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from arq.connections import ArqRedis

from asyncjobs.settings import Settings
from tests.conftest import start_worker, stop_worker
from tests.faults.conftest import (
    delivery_counts,
    job_outcomes,
    job_views,
    post_emails,
    sink_worker_env,
    wait_all_finished,
    wait_in_data,
)
from tests.faults.procs import start_worker_process, stop_process
from tests.helpers import ApiClient, wait_for
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler


@pytest.mark.slow
async def test_sigterm_lets_running_jobs_finish(
    api: ApiClient,
    redis: ArqRedis,
    smtp: tuple[RecordingSmtpHandler, int],
    tmp_path: Path,
    fault_report: Callable[[str], None],
) -> None:
    handler, port = smtp
    handler.data_delay = 1.0  # each job takes a second
    accepted = await post_emails(api, 20, "grace")
    log = tmp_path / "worker.log"
    worker = await start_worker_process(
        log, **sink_worker_env(port, shutdown_grace=10, smtp_max_connections=20)
    )
    try:
        await wait_in_data(handler, 20)
        worker.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()

        async def signal_handled() -> bool:  # arq's handler has stopped taking jobs
            return "shutdown on SIGTERM" in log.read_text(errors="replace")

        await wait_for(signal_handled, what="the worker to log the SIGTERM")
        late = await post_emails(api, 3, "late")  # must not be taken after SIGTERM
        assert await asyncio.wait_for(worker.wait(), timeout=15) == 0
        took = time.monotonic() - stopped_at
    finally:
        await stop_process(worker)

    views = await job_views(redis, [a["job_id"] for a in accepted])
    late_views = await job_views(redis, [a["job_id"] for a in late])
    delivered, lost, duplicates = delivery_counts(handler, accepted)
    completed, _ = job_outcomes(views)
    fault_report(
        f"SIGTERM with 20 running 1-second jobs: completed={completed} lost={lost} "
        f"duplicates={duplicates}, worker exited {took:.1f}s after SIGTERM (grace 10 s)"
    )
    assert [v.status for v in views] == ["complete"] * 20
    assert (delivered, lost, duplicates) == (20, 0, 0)
    assert took < 10
    assert [v.status for v in late_views] == ["queued"] * 3


@pytest.mark.slow
async def test_jobs_still_running_after_grace_are_rerun_not_lost(
    api: ApiClient,
    redis: ArqRedis,
    smtp: tuple[RecordingSmtpHandler, int],
    tmp_path: Path,
    fault_report: Callable[[str], None],
) -> None:
    handler, port = smtp
    handler.data_delay = 30.0  # far longer than the grace period
    accepted = await post_emails(api, 5, "slow")
    log = tmp_path / "worker.log"
    first = await start_worker_process(
        log, **sink_worker_env(port, shutdown_grace=1, smtp_max_connections=20)
    )
    try:
        await wait_in_data(handler, 5)
        first.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(first.wait(), timeout=15) == 0
    finally:
        await stop_process(first)

    async def cut_sends_seen() -> bool:  # the sink saw the connections go, kept what it had
        return handler.open_connections() == 0 and handler.in_data == 0

    await wait_for(cut_sends_seen, what="the sink to see the cut connections close")
    in_final_reply = len(handler.unacknowledged())
    views = await job_views(redis, [a["job_id"] for a in accepted])
    assert [v.status for v in views] == ["queued"] * 5  # back in the queue, not lost

    handler.data_delay = 0.0
    second = await start_worker_process(log, **sink_worker_env(port))
    try:
        views = await wait_all_finished(redis, [a["job_id"] for a in accepted], timeout=30)
    finally:
        await stop_process(second)
    delivered, lost, duplicates = delivery_counts(handler, accepted)
    fault_report(
        f"SIGTERM past the 1 s grace with 5 jobs mid-send (each in its final reply): re-run "
        f"and completed={sum(v.status == 'complete' for v in views)} lost={lost} "
        f"duplicates={duplicates} (in their final reply at the cut: {in_final_reply})"
    )
    assert [v.status for v in views] == ["complete"] * 5
    assert (delivered, lost) == (5, 0)
    # each cut send had its message at the server, which kept it; the re-run cannot know
    assert handler.reply_lost == in_final_reply == 5
    assert duplicates <= in_final_reply  # the documented bound: those in their final reply


async def test_abort_running_and_queued_jobs(
    api: ApiClient,
    redis: ArqRedis,
    settings: Settings,
    smtp: tuple[RecordingSmtpHandler, int],
) -> None:
    handler, _ = smtp
    handler.data_delay = 30.0
    [queued] = await post_emails(api, 1, "queued")
    response = await api.delete(f"/jobs/{queued['job_id']}")  # no worker yet: still queued
    assert response.status == 202
    assert (await response.json())["status_before"] == "queued"

    worker, task = await start_worker(settings)
    try:
        assert (await wait_job(api, queued["job_id"]))["status"] == "aborted"
        [running] = await post_emails(api, 1, "running")
        await wait_in_data(handler, 1)
        response = await api.delete(f"/jobs/{running['job_id']}")
        assert response.status == 202
        assert (await response.json())["status_before"] == "in_progress"
        status = await wait_job(api, running["job_id"])
        assert status["status"] == "aborted" and status["error"] == "aborted"
        assert (await api.delete(f"/jobs/{running['job_id']}")).status == 409
        assert (await api.delete("/jobs/doesnotexist")).status == 404

        async def cut() -> bool:
            return handler.reply_lost == 1 and handler.in_data == 0

        await wait_for(cut, what="the sink to see the aborted send go away")
    finally:
        await stop_worker(worker, task)
    # The abort came in the message's final reply: the server had it whole and keeps it (a
    # real MTA delivers it though the job says aborted: docs/api.md); it is not sent again.
    # The queued job's message never went.
    assert handler.message_ids() == [running["message_id"]]
