"""A waiting job on the dashboard (plain HTTP): its page shows `waiting` and what it waits
for, its parents linked, and the jobs list offers `waiting` among its states and lists the
waiting jobs (they are in no queue: the list reads the queue's waiting index)."""

from __future__ import annotations

import re

from arq.connections import ArqRedis

from app.bulkactions import abort_queued
from asyncjobs.arqcompat import abort_jobs_ss, timestamp_ms
from asyncjobs.keys import waiting_key
from asyncjobs.settings import Settings
from jobs.engine.dependencies import WAIT_TTL_MS
from jobs.engine.queue import enqueue_job
from tests.conftest import start_worker, stop_worker
from tests.dashboard.test_dashboard import (  # noqa: F401  (ui: the fixture)
    EMAIL,
    enqueue_email,
    log_in,
    ui,
)
from tests.helpers import ApiClient
from tests.jobwait import wait_job


async def test_a_waiting_job_page_shows_its_parents_linked(
    ui: ApiClient,  # noqa: F811
    api: ApiClient,
    redis: ArqRedis,
) -> None:
    """No worker: the parents never end."""
    await enqueue_job(redis, "noop", _job_id="parent-1")
    await enqueue_job(redis, "noop", _job_id="parent-2")
    response = await api.post("/jobs/email", json=EMAIL | {"after": ["parent-1", "parent-2"]})
    assert response.status == 202, await response.text()
    job_id = (await response.json())["job_id"]
    await log_in(ui)
    page = await (await ui.get(f"/ui/jobs/{job_id}")).text()
    assert 'id="status" class="badge waiting">waiting<' in page
    assert 'id="waiting-for">after:' in page
    for parent in ("parent-1", "parent-2"):
        assert f'<a href="/ui/jobs/{parent}"><code>{parent}</code></a>' in page
    assert "2 of 2 not ended yet" in page
    jobs = await (await ui.get("/ui/jobs")).text()
    assert "<option>waiting</option>" in jobs  # a state the list filters by


def _listed(page: str) -> list[str]:
    """The job ids of a jobs list's rows, in order."""
    return re.findall(r'<tr data-job-id="([^"]+)">', page)


async def test_the_jobs_list_lists_waiting_jobs_until_they_leave_the_waiting_index(
    ui: ApiClient,  # noqa: F811
    api: ApiClient,
    redis: ArqRedis,
    settings: Settings,
) -> None:
    """`status=waiting` lists the jobs waiting for others, newest first, and so does the top of
    the unfiltered list; a job leaves them when released (its parent completed), cancelled
    (its parent failed), aborted, or when its entry is older than a waiting job lives."""
    index = waiting_key(settings.queue_name)
    await enqueue_job(redis, "no_such_function", _job_id="doomed-parent")  # fails: no function
    parent = await enqueue_email(api)  # queued: no worker yet
    released = await enqueue_email(api, after=[parent])
    cancelled = await enqueue_email(api, after=["doomed-parent"])
    aborted = await enqueue_email(api, after=[parent])
    stale = timestamp_ms() - WAIT_TTL_MS - 1000  # a waiting job that has expired long ago
    await redis.zadd(index, {"expired-long-ago": stale})
    await log_in(ui)

    assert (await api.delete(f"/jobs/{aborted}")).status == 202
    assert await redis.zscore(index, aborted) is None  # out of the index with its abort
    waiting = await (await ui.get("/ui/jobs", params={"status": "waiting"})).text()
    assert _listed(waiting) == [cancelled, released]  # newest first; not the queued parent
    assert await redis.zscore(index, "expired-long-ago") is None  # dropped when read
    everything = _listed(await (await ui.get("/ui/jobs")).text())
    assert everything[:2] == [cancelled, released]
    overview = await (await ui.get("/ui")).text()
    assert '<span class="n" id="waiting">2</span>' in overview

    worker, task = await start_worker(settings, cron_jobs=[])
    try:
        assert (await wait_job(api, released))["status"] == "complete"
        assert (await wait_job(api, cancelled))["status"] == "failed"
        assert (await wait_job(api, aborted))["status"] == "aborted"
    finally:
        await stop_worker(worker, task)
    assert _listed(await (await ui.get("/ui/jobs", params={"status": "waiting"})).text()) == []
    assert await redis.zcard(index) == 0
    overview = await (await ui.get("/ui")).text()
    assert '<span class="n" id="waiting">0</span>' in overview


async def test_the_bulk_abort_reaches_a_job_waiting_for_others(
    api: ApiClient, redis: ArqRedis, settings: Settings
) -> None:
    """The dashboard's bulk abort took only queued and deferred jobs: one waiting for others
    (in no queue) was counted missing and kept waiting."""
    parent = await enqueue_email(api)  # queued: no worker
    held = await enqueue_email(api, after=[parent])
    result = await abort_queued(redis, settings.queue_name, [held, "0" * 32])
    assert (result.done, result.missing) == (1, 1)
    assert await redis.zscore(waiting_key(settings.queue_name), held) is None
    assert await redis.zscore(abort_jobs_ss, held) is not None  # a worker ends it as aborted
    worker, task = await start_worker(settings, cron_jobs=[])
    try:
        assert (await wait_job(api, held))["status"] == "aborted"
    finally:
        await stop_worker(worker, task)
