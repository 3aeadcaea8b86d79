"""SMTP down, then up: emails retry with backoff, none is dead-lettered early, all arrive once."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from arq.connections import ArqRedis

from app.mailsink import start_smtp_server
from asyncjobs.keys import DEAD_INDEX_KEY
from asyncjobs.settings import Settings
from tests.conftest import start_worker, stop_worker
from tests.faults.conftest import delivery_counts, job_views, post_emails, wait_all_finished
from tests.helpers import ApiClient, api_client, free_port, wait_for
from tests.servers import RecordingSmtpHandler

COUNT = 50
OLD_MAX_TRIES = 5  # the default before email retries followed an MTA: all dead-lettered


@pytest.mark.slow
@pytest.mark.timeout(180)  # past its own waits (60 + 60 s); the global one is 120 s
async def test_emails_wait_out_an_smtp_outage(
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    fault_report: Callable[[str], None],
) -> None:

    from app.web import create_app

    port = free_port()  # nothing listens here yet: the SMTP server is "down"
    # The default schedule (1 min to 1 h for 2 days), scaled down: 50 ms to 300 ms between
    # tries, with the default lifetime and try ceiling.
    settings = make_settings(smtp_port=port, email_retry_max_delay=0.3)
    worker, task = await start_worker(settings)
    handler = RecordingSmtpHandler()
    try:
        api: ApiClient
        async with api_client(create_app(settings)) as api:
            accepted = await post_emails(api, COUNT, "outage")
            job_ids = [a["job_id"] for a in accepted]

            async def past_the_old_budget() -> bool:  # it gave up after 5 tries
                return all((v.tries or 0) > OLD_MAX_TRIES for v in await job_views(redis, job_ids))

            await wait_for(past_the_old_budget, timeout=60, what="every email tried 6 times")
            assert await redis.zcard(DEAD_INDEX_KEY) == 0
            views = await job_views(redis, job_ids)
            statuses = {v.status for v in views}
            assert statuses <= {"deferred", "queued", "in_progress"}, statuses
            waiting = [v for v in views if v.status == "deferred"]
            assert waiting, "no email was waiting for its next try"
            for view in waiting:  # why it waits, and until when
                assert view.error and "could not connect" in view.error, view
                assert view.next_try_at is not None, view

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
    assert all(v.error is None and v.next_try_at is None for v in views)
    assert (delivered, lost, duplicates) == (COUNT, 0, 0)
    assert await redis.zcard(DEAD_INDEX_KEY) == 0
