"""Schedules for any job: the API's validation and CRUD, next runs in a time zone, one run per
period across workers (with explicit times: no test here depends on the clock's minute), and
a scheduled email delivered by a real worker to a real SMTP server."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from arq.connections import ArqRedis
from arq.jobs import Job

from asyncjobs.settings import Settings
from jobs.schedules import Schedule, get_schedule, run_due_schedules
from tests.conftest import AUTH, start_worker, stop_worker
from tests.helpers import ApiClient, wait_for
from tests.servers import RecordingSmtpHandler

EMAIL = {"to": "weekly@example.com", "subject": "Digest", "text": "x"}
EMAIL_JOB: dict[str, Any] = {"type": "email", "body": EMAIL}


async def create(api: ApiClient, **body: Any) -> dict[str, Any]:
    response = await api.post("/schedules", json=body, headers=AUTH)
    assert response.status == 201, await response.text()
    created: dict[str, Any] = await response.json()
    return created


async def test_a_cron_schedule_in_a_time_zone_lists_its_next_runs(
    api: ApiClient, redis: ArqRedis
) -> None:
    schedule = await create(api, cron="0 9 * * 1", timezone="Europe/Paris", job=EMAIL_JOB)
    runs = [datetime.fromisoformat(t) for t in schedule["next_runs"]]
    assert len(runs) == 5 and runs == sorted(runs) and runs[0] > datetime.now(UTC)
    for run in runs:  # every Monday 09:00 in Paris, whatever its offset that day
        local = run.astimezone(ZoneInfo("Europe/Paris"))
        assert (local.weekday(), local.hour, local.minute) == (0, 9, 0)
    assert [b - a for a, b in itertools.pairwise(runs)] == [timedelta(days=7)] * 4


def test_next_runs_follow_daylight_saving_time() -> None:
    when = datetime(2026, 3, 27, 12, tzinfo=UTC)  # Paris moves to UTC+2 on 29 March
    schedule = Schedule(
        id="x", cron="0 9 * * *", timezone="Europe/Paris", job={"type": "report"},
        created_at=when, updated_at=when,
    )  # fmt: skip
    hours = [run.hour for run in schedule.upcoming(when, 4)]
    assert hours == [8, 7, 7, 7]  # 28 March 09:00 is 08:00 UTC; from the 29th, 07:00


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"cron": "61 * * * *", "job": EMAIL_JOB}, "cron"),
        ({"cron": "0 0 31 2 *", "job": EMAIL_JOB}, "cron"),  # 31 February never comes
        ({"every": 59, "job": EMAIL_JOB}, "every"),
        ({"every": 60, "timezone": "Mars/Olympus", "job": EMAIL_JOB}, "timezone"),
        ({"every": 60, "job": {"type": "fax"}}, "job.type"),
        ({"every": 60, "job": {"type": "email", "body": {"to": "a@example.com"}}}, "job.body"),
        ({"every": 60, "job": {**EMAIL_JOB, "body": {**EMAIL, "to": "nope"}}},
         "job.body.to"),
        ({"every": 60, "job": {"type": "scrape", "body": {"url": "ftp://x"}}}, "job.body.url"),
        ({"every": 60, "job": {**EMAIL_JOB, "callback_url": "https://example.com/h"}},
         "job.callback_url"),  # no WEBHOOK_SECRET
        ({"every": 60, "job": {**EMAIL_JOB, "priority": "asap"}}, "job.priority"),
    ],
)  # fmt: skip
async def test_bad_schedules_are_422_naming_the_field(
    api: ApiClient, redis: ArqRedis, body: dict[str, Any], field: str
) -> None:
    response = await api.post("/schedules", json=body, headers=AUTH)
    assert response.status == 422, await response.text()
    fields = [d["field"] for d in (await response.json())["details"]]
    assert fields and all(f.startswith(field) for f in fields), fields


async def test_cron_and_every_are_one_or_the_other(api: ApiClient, redis: ArqRedis) -> None:
    for body in ({"job": EMAIL_JOB}, {"cron": "* * * * *", "every": 60, "job": EMAIL_JOB}):
        response = await api.post("/schedules", json=body, headers=AUTH)
        assert response.status == 422
        assert "exactly one of 'cron' or 'every'" in await response.text()


async def test_crud_pause_and_resume(api: ApiClient, redis: ArqRedis) -> None:
    schedule = await create(api, name="digest", cron="0 9 * * *", job=EMAIL_JOB)
    one = f"/schedules/{schedule['id']}"
    listed = await (await api.get("/schedules", headers=AUTH)).json()
    assert [s["id"] for s in listed["schedules"]] == [schedule["id"]]

    changed = await api.patch(one, json={"every": 3600}, headers=AUTH)
    assert changed.status == 200
    body = await changed.json()
    assert body["every"] == 3600 and body["cron"] is None and body["name"] == "digest"

    paused = await (await api.post(f"{one}/pause", headers=AUTH)).json()
    assert paused["paused"] is True and paused["next_runs"] == []
    resumed = await (await api.post(f"{one}/resume", headers=AUTH)).json()
    assert resumed["paused"] is False and len(resumed["next_runs"]) == 5

    assert (await api.delete(one, headers=AUTH)).status == 204
    assert (await api.get(one, headers=AUTH)).status == 404
    assert (await api.post(f"{one}/pause", headers=AUTH)).status == 404


async def test_each_period_runs_once_however_many_workers_tick(
    api: ApiClient, redis: ArqRedis, settings: Settings
) -> None:
    """Three ticks at once in one period enqueue one run; the next period, one more; a
    paused schedule none. Times are given, not read from the clock."""
    created = await create(api, every=60, job=EMAIL_JOB)
    schedule = await get_schedule(redis, created["id"])
    assert schedule is not None
    tick = schedule.period_start(schedule.created_at) + timedelta(seconds=90)
    ran = await asyncio.gather(*(run_due_schedules(redis, settings, tick) for _ in range(3)))
    assert sorted(map(len, ran)) == [0, 0, 1]
    assert await redis.zcard(settings.queue_name) == 1
    assert await run_due_schedules(redis, settings, tick + timedelta(seconds=20)) == []
    assert await run_due_schedules(redis, settings, tick + timedelta(seconds=60)) == [schedule.id]
    runs = (await (await api.get(f"/schedules/{schedule.id}/runs", headers=AUTH)).json())["runs"]
    assert len(runs) == 2 and all(len(run["jobs"]) == 1 for run in runs)
    assert all(job["status"] == "queued" for run in runs for job in run["jobs"])
    # each run's email gets a Message-ID of its own, fixed at its enqueue
    infos = [await Job(job["job_id"], redis).info() for run in runs for job in run["jobs"]]
    message_ids = {info.kwargs["message_id"] for info in infos if info is not None}
    assert len(message_ids) == 2 and all(m.startswith("<") for m in message_ids)

    await api.post(f"/schedules/{schedule.id}/pause", headers=AUTH)
    assert await run_due_schedules(redis, settings, tick + timedelta(seconds=120)) == []
    assert await redis.zcard(settings.queue_name) == 2


async def test_a_period_that_began_before_the_schedule_is_not_run(
    api: ApiClient, redis: ArqRedis, settings: Settings
) -> None:
    created = await create(api, cron="0 0 1 1 *", job=EMAIL_JOB)  # once a year
    schedule = await get_schedule(redis, created["id"])
    assert schedule is not None
    assert await run_due_schedules(redis, settings, schedule.created_at) == []
    assert await redis.zcard(settings.queue_name) == 0


async def test_a_scheduled_email_is_delivered_and_its_run_shows_complete(
    api: ApiClient,
    redis: ArqRedis,
    make_settings: Callable[..., Settings],
    smtp: tuple[RecordingSmtpHandler, int],
) -> None:
    handler, _ = smtp
    settings = make_settings()
    created = await create(api, every=60, job=EMAIL_JOB)
    schedule = await get_schedule(redis, created["id"])
    assert schedule is not None
    tick = schedule.period_start(schedule.created_at) + timedelta(seconds=60)
    assert await run_due_schedules(redis, settings, tick) == [schedule.id]
    worker, task = await start_worker(settings, cron_jobs=[])
    try:

        async def complete() -> bool:
            runs = await (await api.get(f"/schedules/{schedule.id}/runs", headers=AUTH)).json()
            return bool(runs["runs"][0]["jobs"][0]["status"] == "complete")

        await wait_for(complete, what="the scheduled email")
    finally:
        await stop_worker(worker, task)
    assert [m.rcpt_tos for m in handler.messages] == [["weekly@example.com"]]
