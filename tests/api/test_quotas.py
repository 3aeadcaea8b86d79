"""Requests per window and messages per hour agree with each other and with the largest
requests allowed: the default quota admits a 10,000-recipient newsletter, a 429 comes only
when waiting helps (with a Retry-After that is true), a 422 when a request can never fit, and
each run of a schedule is charged to the key that owns it."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from arq.connections import ArqRedis
from pydantic import ValidationError

from app.web import create_app
from asyncjobs.settings import Settings
from jobs.schedules import get_schedule, run_due_schedules
from tests.helpers import ApiClient, api_client, wait_for


def newsletter(recipients: int) -> dict[str, Any]:
    to = [f"reader{n}@example.com" for n in range(recipients)]
    return {"recipients": to, "subject": "News", "text": "Hello"}


def email(recipients: int) -> dict[str, Any]:
    to = [f"r{n}@example.com" for n in range(recipients)]
    return {"to": to, "subject": "Hi", "text": "x"}


@pytest.mark.slow
async def test_default_limits_admit_the_largest_newsletter_and_then_say_how_long_to_wait(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    """It used to be: any newsletter over ~119 recipients refused forever, with a Retry-After
    that did not help. Default rate limit and quota; two full newsletters fill the bucket."""
    settings = make_settings(
        rate_limit_requests=Settings.model_fields["rate_limit_requests"].default
    )
    largest = settings.newsletter_max_recipients
    assert (largest, settings.mail_messages_per_hour) == (10_000, 20_000)
    async with api_client(create_app(settings)) as client:
        for _ in range(2):
            accepted = await client.post("/jobs/newsletter", json=newsletter(largest))
            assert accepted.status == 202, await accepted.text()
        refused = await client.post("/jobs/newsletter", json=newsletter(largest))
        assert refused.status == 429
        # 10,000 messages refill at 20,000 an hour: half an hour, less the time gone by
        assert 1700 <= int(refused.headers["Retry-After"]) <= 1800
        assert "20000 messages per hour" in (await refused.json())["message"]


@pytest.mark.slow
async def test_a_429s_retry_after_is_true(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    """3,600 an hour is one a second: after taking them all, 3 more fit in 3 s, not before
    about 2 s, and they are admitted once the Retry-After has passed."""
    settings = make_settings(mail_messages_per_hour=3600, newsletter_max_recipients=3600)
    async with api_client(create_app(settings)) as client:
        assert (await client.post("/jobs/newsletter", json=newsletter(3600))).status == 202
        refused = await client.post("/jobs/email", json=email(3))
        refused_at = time.monotonic()
        assert refused.status == 429
        retry_after = int(refused.headers["Retry-After"])
        assert retry_after in (2, 3), retry_after

        async def admitted() -> bool:
            status = (await client.post("/jobs/email", json=email(3))).status
            assert status in (202, 429), status
            return status == 202

        await wait_for(admitted, timeout=retry_after + 2, interval=0.25, what="room for 3")
        assert time.monotonic() - refused_at >= 1.5  # not admitted at once: it did wait


async def test_a_request_that_can_never_fit_is_422_not_429(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    settings = make_settings(
        mail_messages_per_hour=40, newsletter_max_recipients=40, rate_limit_requests=5
    )
    async with api_client(create_app(settings)) as client:
        too_many_messages = await client.post("/jobs/email", json=email(45))
        assert too_many_messages.status == 422
        assert "MAIL_MESSAGES_PER_HOUR" in (await too_many_messages.json())["message"]
        urls = [f"http://127.0.0.1:9/{n}" for n in range(8)]
        too_many_urls = await client.post("/jobs/scrape", json={"urls": urls})
        assert too_many_urls.status == 422
        assert "RATE_LIMIT_REQUESTS" in (await too_many_urls.json())["message"]
        assert "Retry-After" not in too_many_urls.headers
        # neither was charged: what fits still fits
        assert (await client.post("/jobs/email", json=email(40))).status == 202


def test_settings_whose_limits_contradict_each_other_refuse_to_start() -> None:
    with pytest.raises(ValidationError, match=r"NEWSLETTER_MAX_RECIPIENTS=500.*PER_HOUR=100"):
        Settings(_env_file=None, mail_messages_per_hour=100, newsletter_max_recipients=500)


@pytest.mark.parametrize(
    ("rule", "recipients"),
    [({"every": 60}, 1000), ({"cron": "*/5 * * * *"}, 2000), ({"cron": "0,20,40 9 * * 1"}, 7000)],
)
@pytest.mark.slow
async def test_a_schedule_whose_runs_never_fit_is_refused_at_creation(
    api: ApiClient, rule: dict[str, Any], recipients: int
) -> None:
    """every 60 s to 1,000 is 60,000 an hour; */5 to 2,000 is 24,000; three runs in one hour
    on Mondays to 7,000 is 21,000. The quota is 20,000 an hour."""
    job = {"type": "newsletter", "body": newsletter(recipients)}
    response = await api.post("/schedules", json=rule | {"job": job})
    assert response.status == 422, await response.text()
    body = await response.json()
    assert "busiest hour" in body["message"] and "MAIL_MESSAGES_PER_HOUR" in body["message"]


@pytest.mark.slow
async def test_a_schedule_that_fits_is_accepted_and_a_patch_cannot_make_it_overflow(
    api: ApiClient,
) -> None:
    job = {"type": "newsletter", "body": newsletter(10_000)}
    created = await api.post("/schedules", json={"every": 3600, "job": job})
    assert created.status == 201, await created.text()
    one = f"/schedules/{(await created.json())['id']}"
    assert (await api.patch(one, json={"every": 60})).status == 422
    assert (await (await api.get(one)).json())["every"] == 3600  # unchanged


@pytest.mark.slow
async def test_each_run_of_a_schedule_is_charged_to_its_owner_once_and_skipped_when_full(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    """It used to be: charged once at creation, never per run. Here the owner's quota holds 5
    messages an hour; each run sends 3. Ticks are given their times (no clock edge)."""
    settings = make_settings(mail_messages_per_hour=5, newsletter_max_recipients=5)
    job = {"type": "newsletter", "body": newsletter(3)}
    async with api_client(create_app(settings)) as client:
        created = await client.post("/schedules", json={"every": 3600, "job": job})
        assert created.status == 201, await created.text()
        schedule = await get_schedule(redis, (await created.json())["id"])
        assert schedule is not None and schedule.owner is not None
        first = schedule.period_start(schedule.created_at) + timedelta(hours=1, seconds=5)
        second = first + timedelta(hours=1)
        ticks = [run_due_schedules(redis, settings, first) for _ in range(3)]
        assert sorted(map(len, await asyncio.gather(*ticks))) == [0, 0, 1]
        ticks = [run_due_schedules(redis, settings, second) for _ in range(3)]
        assert [len(ran) for ran in await asyncio.gather(*ticks)] == [0, 0, 0]
        assert await redis.zcard(settings.queue_name) == 1  # the first run's newsletter only
        runs = (await (await client.get(f"/schedules/{schedule.id}/runs")).json())["runs"]
        assert [len(run["jobs"]) for run in runs] == [0, 1]  # newest first
        assert "needs 3 messages" in runs[0]["skipped"]
        assert runs[1]["skipped"] is None
        # the first run took 3 of 5, the skipped one nothing: the API shares the same bucket
        assert (await client.post("/jobs/email", json=email(2))).status == 202
        over = await client.post("/jobs/email", json=email(1))
        assert over.status == 429
        assert math.ceil(3600 / 5) - 5 <= int(over.headers["Retry-After"]) <= 3600 / 5
