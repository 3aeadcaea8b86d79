"""SMTP down, then up: emails retry with backoff, none is dead-lettered early, all arrive once."""

from __future__ import annotations

from collections.abc import Callable

from arq.connections import ArqRedis

from app.mailsink import start_smtp_server
from app.settings import Settings
from jobs.deadletter import DEAD_INDEX_KEY
from tests.conftest import start_worker, stop_worker
from tests.faults.conftest import delivery_counts, job_views, post_emails, wait_all_finished
from tests.helpers import ApiClient, api_client, free_port, wait_for
from tests.servers import RecordingSmtpHandler

COUNT = 50


async def test_emails_wait_out_an_smtp_outage(
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    fault_report: Callable[[str], None],
) -> None:

    from app.web import create_app

    port = free_port()  # nothing listens here yet: the SMTP server is "down"
    settings = make_settings(
        smtp_port=port, email_max_tries=20, retry_base_delay=0.05, retry_max_delay=0.3
    )
    worker, task = await start_worker(settings)
    handler = RecordingSmtpHandler()
    try:
        api: ApiClient
        async with api_client(create_app(settings)) as api:
            accepted = await post_emails(api, COUNT, "outage")
            job_ids = [a["job_id"] for a in accepted]

            async def all_retried() -> bool:
                return all((v.tries or 0) >= 2 for v in await job_views(redis, job_ids))

            await wait_for(all_retried, timeout=30, what="every email to be retried")
            assert await redis.zcard(DEAD_INDEX_KEY) == 0
            statuses = {v.status for v in await job_views(redis, job_ids)}
            assert statuses <= {"deferred", "queued", "in_progress"}, statuses

            server = await start_smtp_server(handler, port=port)  # the server comes back
            try:
                views = await wait_all_finished(redis, job_ids, timeout=60)
            finally:
                server.close()
                await server.wait_closed()
    finally:
        await stop_worker(worker, task)

    delivered, lost, duplicates = delivery_counts(handler, accepted)
    max_tries = max(v.tries or 0 for v in views)
    fault_report(
        f"SMTP outage: enqueued={COUNT} completed={sum(v.status == 'complete' for v in views)} "
        f"lost={lost} duplicates={duplicates} (up to {max_tries} tries each, 0 dead-lettered)"
    )
    assert [v.status for v in views] == ["complete"] * COUNT
    assert (delivered, lost, duplicates) == (COUNT, 0, 0)
    assert await redis.zcard(DEAD_INDEX_KEY) == 0
