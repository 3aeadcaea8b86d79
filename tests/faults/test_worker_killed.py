"""kill -9 of a worker while it sends, at several moments and concurrencies, with no gate: no
message is lost, and a message is sent twice only if it was in its final SMTP reply.

The promise (docs/operations.md, "Delivery guarantees"): the sent marker is written before the
message's SMTP connection carries anything else, so after a crash the only messages the re-run
can send again are those the server had accepted while their sender had not yet written the
marker. The sink counts those itself (accepted, and the client said nothing after on that
connection), and the test asserts duplicates <= that count <= SMTP_MAX_CONNECTIONS.

The sink keeps a message it has whole (the final "." came) though its client dies before the
250, as Postfix and Exim do: a real Exim took 13 duplicates in 9 such kills. A sink that
dropped those would hide the very window the bound is about.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from arq.connections import ArqRedis

from asyncjobs.arqcompat import default_queue_name, health_check_key_suffix
from tests.faults.conftest import (
    delivery_counts,
    job_outcomes,
    post_emails,
    sink_worker_env,
    wait_all_finished,
)
from tests.faults.procs import start_worker_process, stop_process
from tests.helpers import ApiClient, wait_for
from tests.servers import RecordingSmtpHandler

TOTAL = 300
SMTP_CONNECTIONS = 10  # the default of SMTP_MAX_CONNECTIONS
HEALTH_CHECK_KEY = default_queue_name + health_check_key_suffix


async def kill_when(moment: str, handler: RecordingSmtpHandler) -> None:
    """Return at the moment of the kill: the first message accepted, or half of them."""
    wanted = {"early": 1, "mid-batch": TOTAL // 2}[moment]

    async def reached() -> bool:
        return len(handler.messages) >= wanted

    await wait_for(reached, timeout=60, interval=0.001, what=f"{wanted} messages at the sink")


@pytest.mark.parametrize("max_jobs", [10, 200])
@pytest.mark.parametrize("moment", ["early", "mid-batch", "after enqueueing"])
@pytest.mark.slow
@pytest.mark.timeout(240)  # past its own waits (60 + 120 s); the global one is 120 s
async def test_kill_9_loses_nothing_and_duplicates_only_messages_in_their_final_reply(
    api: ApiClient,
    redis: ArqRedis,
    smtp: tuple[RecordingSmtpHandler, int],
    tmp_path: Path,
    fault_report: Callable[[str], None],
    moment: str,
    max_jobs: int,
) -> None:
    handler, smtp_port = smtp
    handler.data_delay = 0.05  # a real MTA takes a while to queue a message (fsync) before its 250
    worker_settings = sink_worker_env(
        smtp_port,
        worker_max_jobs=max_jobs,
        smtp_max_connections=SMTP_CONNECTIONS,
        job_lease_seconds=3,  # the killed worker's jobs run again 3 s after the kill
    )
    log = tmp_path / "workers.log"
    if moment != "after enqueueing":  # a backlog the worker is in the middle of at the kill
        accepted = await post_emails(api, TOTAL, "kill")
    first = await start_worker_process(log, **worker_settings)
    try:
        if moment == "after enqueueing":  # the worker sends while the API takes the requests

            async def worker_up() -> bool:  # its first health check is written when it polls
                return bool(await redis.exists(HEALTH_CHECK_KEY))

            await wait_for(worker_up, what=f"the worker to start; see {log}")
            accepted = await post_emails(api, TOTAL, "kill")
        else:
            await kill_when(moment, handler)
        os.kill(first.pid, signal.SIGKILL)
        await first.wait()
        sent_before_kill = len(handler.messages)

        async def killed_connections_closed() -> bool:  # and the messages in DATA kept
            return handler.open_connections() == 0 and handler.in_data == 0

        await wait_for(killed_connections_closed, what="the sink to see the killed connections")
        in_final_reply = len(handler.unacknowledged())

        second = await start_worker_process(log, **worker_settings)
        try:
            views = await wait_all_finished(redis, [a["job_id"] for a in accepted], timeout=120)
        finally:
            await stop_process(second)
    finally:
        await stop_process(first)

    completed, rerun = job_outcomes(views)
    _, lost, duplicates = delivery_counts(handler, accepted)
    fault_report(
        f"kill -9 {moment}, WORKER_MAX_JOBS={max_jobs}: enqueued={TOTAL} completed={completed} "
        f"lost={lost} duplicates={duplicates} (in their final reply at the kill: "
        f"{in_final_reply}; sent before the kill: {sent_before_kill}; {rerun} jobs re-run; "
        f"{handler.reply_lost} of them kept by the sink after their client was gone)"
    )
    assert completed == TOTAL
    assert lost == 0
    assert duplicates <= in_final_reply <= SMTP_CONNECTIONS
    assert rerun > 0, "the kill interrupted no job: the test proved nothing"
    assert in_final_reply > 0, "the kill caught no message in its final reply: bound untested"
