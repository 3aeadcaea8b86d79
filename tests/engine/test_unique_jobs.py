"""Unique jobs (issue 31): a `unique_key` answers the job already holding it while that job is
queued, deferred, running or waiting for a retry, within its window; per API key and job type.
From the API, the client, a schedule and `JobContext.enqueue`, with a real worker and Redis."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from arq.connections import ArqRedis

from app.web import create_app
from asyncjobs import JobContext, job
from asyncjobs.arqcompat import job_key_prefix
from asyncjobs.client import Client
from asyncjobs.registry import unregister
from asyncjobs.settings import Settings
from jobs.engine.queue import enqueue_job
from jobs.engine.unique import ExistingJob, Unique
from jobs.schedules import run_due_schedules
from jobs.values import now_utc
from tests.conftest import API_KEY, api_and_worker
from tests.engine.test_queue_scripts import _script_keys
from tests.helpers import ApiClient, api_client, served, wait_for

SYNC, PARENT = "unique_test_sync", "unique_test_parent"
RUNS = "test:unique:runs"  # how many times the sync job has run
RELEASE = "test:unique:release"  # the sync jobs run until it exists
OTHER_KEY = "test-key-other-owner"


async def _sync_user(ctx: JobContext, user_id: int) -> int:
    """Counts its run, then holds its slot until the test releases it."""
    runs = int(await ctx.redis.incr(RUNS))
    for _ in range(1000):
        if await ctx.redis.exists(RELEASE):
            break
        await asyncio.sleep(0.01)
    return runs


async def _parent(ctx: JobContext, user_id: int) -> list[str]:
    """Enqueues the sync twice with one unique key: the second gets the first's id."""
    return [
        await ctx.enqueue(SYNC, user_id=user_id, unique_key=f"user-{user_id}"),
        await ctx.enqueue(SYNC, user_id=user_id, unique_key=f"user-{user_id}"),
    ]


@pytest.fixture
def declared() -> Iterator[None]:
    job(name=SYNC, tries=1)(_sync_user)
    job(name=PARENT, tries=1)(_parent)
    yield
    unregister(SYNC)
    unregister(PARENT)


async def _post(api: ApiClient, body: dict[str, Any], key: str = API_KEY, **headers: str) -> Any:
    headers["Authorization"] = f"Bearer {key}"
    response = await api.post(f"/jobs/{SYNC}", json=body, headers=headers)
    assert response.status == 202, await response.text()
    return await response.json()


async def _status(api: ApiClient, job_id: str) -> str:
    status: str = (await (await api.get(f"/jobs/{job_id}")).json())["status"]
    return status


async def _complete(api: ApiClient, job_id: str) -> None:
    async def done() -> bool:
        return await _status(api, job_id) == "complete"

    await wait_for(done, what=f"job {job_id} to complete")


async def test_concurrent_posts_with_one_key_make_one_job_and_one_run(
    declared: None, settings: Settings, redis: ArqRedis
) -> None:
    async with api_and_worker(settings) as api:
        body = {"user_id": 42, "unique_key": "sync-user-42"}
        answers = await asyncio.gather(*(_post(api, body) for _ in range(3)))
        assert len({a["job_id"] for a in answers}) == 1, answers
        assert sorted(a.get("existing", False) for a in answers) == [False, True, True]
        first = answers[0]["job_id"]

        async def running() -> bool:
            return await _status(api, first) == "in_progress"

        await wait_for(running, what="the job to start")
        again = await _post(api, body)  # while it runs: still the same job
        assert (again["job_id"], again["existing"]) == (first, True)
        await redis.set(RELEASE, 1)
        await _complete(api, first)
        assert int(await redis.get(RUNS) or 0) == 1  # one run for four requests

        after = await _post(api, body)  # it has ended: a new job may start
        assert after["job_id"] != first and "existing" not in after
        await _complete(api, after["job_id"])
        assert int(await redis.get(RUNS) or 0) == 2


async def test_the_window_ends_the_key_and_keys_are_per_api_key_and_type(
    declared: None, make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    """No worker: the jobs stay queued (deferred), so only the window or the scope frees a key."""
    settings = make_settings(api_keys=[API_KEY, OTHER_KEY])
    async with api_client(create_app(settings)) as api:
        body = {"user_id": 1, "unique_key": "k", "unique_window_seconds": 0.5, "delay_seconds": 60}
        first = (await _post(api, body))["job_id"]
        assert (await _post(api, body))["job_id"] == first
        other = await _post(api, body, key=OTHER_KEY)  # another API key: its own key
        assert other["job_id"] != first and "existing" not in other
        assert (await _post(api, body, key=OTHER_KEY))["job_id"] == other["job_id"]
        await asyncio.sleep(0.7)  # the window has passed; the job is still deferred
        assert await _status(api, first) == "deferred"
        later = await _post(api, body)
        assert later["job_id"] != first and "existing" not in later

        # the same key for another job type is another key
        report = await api.post("/jobs/report", json={"unique_key": "k", "delay_seconds": 60})
        assert "existing" not in await report.json()
        again = await api.post("/jobs/report", json={"unique_key": "k", "delay_seconds": 60})
        assert (await again.json())["existing"] is True


async def test_bad_unique_options_are_422s(
    declared: None, make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    settings = make_settings(unique_window_max=60)
    async with api_client(create_app(settings)) as api:
        cases = [
            {"user_id": 1, "unique_key": ""},
            {"user_id": 1, "unique_key": "x" * 256},
            {"user_id": 1, "unique_key": "k", "unique_window_seconds": 61},
            {"user_id": 1, "unique_key": "k", "unique_window_seconds": 0},
            {"user_id": 1, "unique_window_seconds": 10},
        ]
        for body in cases:
            response = await api.post(f"/jobs/{SYNC}", json=body)
            assert response.status == 422, (body, await response.text())
        batch = {"urls": ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"], "unique_key": "k"}
        assert (await api.post("/jobs/scrape", json=batch)).status == 422


async def test_an_idempotency_key_and_a_unique_key_compose(
    declared: None, settings: Settings, redis: ArqRedis
) -> None:
    async with api_client(create_app(settings)) as api:
        body = {"user_id": 7, "unique_key": "u7", "delay_seconds": 60}
        first = await _post(api, body, **{"Idempotency-Key": "a"})
        retried = await api.post(
            f"/jobs/{SYNC}", json=body, headers={"Idempotency-Key": "a"}
        )  # the same request again: the first answer, replayed
        assert retried.headers.get("Idempotent-Replayed") == "true"
        assert await retried.json() == first and "existing" not in first
        other = await _post(api, body, **{"Idempotency-Key": "b"})  # another request
        assert (other["job_id"], other["existing"]) == (first["job_id"], True)


async def test_an_existing_job_is_not_charged_its_cost_again(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    """cost=4 and RATE_LIMIT_REQUESTS=10: the first request counts 4, each repeat answered
    with the existing job only its own 1, so five repeats fit (4 + 5 = 9)."""
    job(name=SYNC, tries=1, cost=4)(_sync_user)
    try:
        settings = make_settings(rate_limit_requests=10, rate_limit_window=3600)
        async with api_client(create_app(settings)) as api:
            body = {"user_id": 3, "unique_key": "costly", "delay_seconds": 60}
            answers = [await api.post(f"/jobs/{SYNC}", json=body) for _ in range(6)]
            assert [a.status for a in answers] == [202] * 6
            assert len({(await a.json())["job_id"] for a in answers}) == 1
    finally:
        unregister(SYNC)


async def test_the_client_gets_the_existing_id(
    declared: None, settings: Settings, redis: ArqRedis
) -> None:
    async with served(settings) as port, Client(f"http://127.0.0.1:{port}", API_KEY) as client:
        first = await client.enqueue(SYNC, user_id=5, unique_key="c5", delay_seconds=60)
        second = await client.enqueue(SYNC, user_id=5, unique_key="c5", delay_seconds=60)
        third = await client.enqueue(SYNC, user_id=5, unique_key="c6", delay_seconds=60)
    assert first == second != third
    assert (first.existing, second.existing, third.existing) == (False, True, False)


async def test_a_schedule_run_gets_the_job_holding_its_key(
    declared: None, settings: Settings, redis: ArqRedis
) -> None:
    async with api_client(create_app(settings)) as api:
        spec = {
            "every": 60,
            "job": {"type": SYNC, "body": {"user_id": 9}, "unique_key": "nightly-9"},
        }
        created = await api.post("/schedules", json=spec)
        assert created.status == 201, await created.text()
        schedule = await created.json()
        assert schedule["job"]["unique_window_seconds"] == 3600  # the default, stored
        runs = []
        for _ in range(2):  # no worker: the first run's job is still queued
            response = await api.post(f"/schedules/{schedule['id']}/run")
            assert response.status == 202, await response.text()
            runs.append((await response.json())["job_ids"])
        assert runs[0] == runs[1] and len(runs[0]) == 1
        # the periodic run too (its period after the schedule's creation)
        ran = await run_due_schedules(redis, settings, now_utc() + timedelta(seconds=120))
        assert ran == [schedule["id"]]
        history = await (await api.get(f"/schedules/{schedule['id']}/runs")).json()
        newest = history["runs"][0]
        assert not newest["manual"] and [j["job_id"] for j in newest["jobs"]] == runs[0]
        bad = {"every": 60, "job": {"type": SYNC, "body": {"user_id": 9}, "unique_key": ""}}
        refused = await api.post("/schedules", json=bad)
        assert refused.status == 422 and "job.unique_key" in await refused.text()


async def test_a_schedule_run_held_by_its_key_is_not_charged_again(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    """A run that gets the job holding its unique key sends nothing new, so it takes nothing
    from the owner's hourly message quota (it used to be charged, and then skipped)."""
    settings = make_settings(mail_messages_per_hour=3, newsletter_max_recipients=3)
    email = {"to": ["a@example.com", "b@example.com"], "subject": "Digest", "text": "Hi"}
    async with api_client(create_app(settings)) as api:
        spec = {"every": 3600, "job": {"type": "email", "body": email, "unique_key": "digest"}}
        created = await api.post("/schedules", json=spec)
        assert created.status == 201, await created.text()
        schedule_id = (await created.json())["id"]
        for hours in (1.05, 2.05):  # two periods, no worker: the first run's job stays queued
            later = now_utc() + timedelta(hours=hours)
            assert await run_due_schedules(redis, settings, later) == [schedule_id]
        runs = (await (await api.get(f"/schedules/{schedule_id}/runs")).json())["runs"]
        assert [run["skipped"] for run in runs] == [None, None]
        assert runs[0]["jobs"] == runs[1]["jobs"] and len(runs[0]["jobs"]) == 1
        # the first run took 2 of the 3 messages, the second none: one more fits, two do not
        two = await api.post("/jobs/email", json=email)
        assert two.status == 429, await two.text()
        one = await api.post("/jobs/email", json=email | {"to": ["c@example.com"]})
        assert one.status == 202, await one.text()


async def test_a_job_enqueuing_jobs_gets_the_existing_id_in_its_owners_scope(
    declared: None, settings: Settings, redis: ArqRedis
) -> None:
    async with api_and_worker(settings) as api:
        response = await api.post(f"/jobs/{PARENT}", json={"user_id": 11})
        parent = (await response.json())["job_id"]
        await _complete(api, parent)
        view = await (await api.get(f"/jobs/{parent}")).json()
        first, second = view["result"]
        assert first == second
        # the follow-up's key is the API key's that enqueued the parent
        mine = await _post(api, {"user_id": 11, "unique_key": "user-11"})
        assert (mine["job_id"], mine["existing"]) == (first, True)
        await redis.set(RELEASE, 1)
        await _complete(api, first)


async def test_the_script_takes_a_free_key_and_answers_a_live_holder(redis: ArqRedis) -> None:
    """The engine alone: a holder whose job has ended (its job key gone) frees the key; an
    enqueue under the holder's own id (a retried request) is a taken id, not an existing job."""
    unique = Unique("k", 60, scope="owner")
    first = await enqueue_job(redis, "noop", _unique=unique)
    again = await enqueue_job(redis, "noop", _unique=unique)
    assert isinstance(again, ExistingJob) and again == first
    assert await enqueue_job(redis, "noop", _unique=unique, _job_id=first) is None
    assert await enqueue_job(redis, "noop", _unique=Unique("k", 60, scope="other")) != first
    assert first is not None
    await redis.delete(job_key_prefix + first)  # as a finish does
    later = await enqueue_job(redis, "noop", _unique=unique)
    assert later not in (None, first) and not isinstance(later, ExistingJob)
    ttl = await redis.pttl(unique.redis_key("noop"))
    assert 0 < ttl <= 60_000


async def test_the_openapi_document_shows_the_unique_options(api: ApiClient) -> None:
    spec: dict[str, Any] = await (await api.get("/openapi.json")).json()
    schemas = spec["components"]["schemas"]
    email = spec["paths"]["/jobs/email"]["post"]["requestBody"]["content"]["application/json"]
    merged = schemas[email["schema"]["$ref"].rsplit("/", 1)[1]]
    assert {"unique_key", "unique_window_seconds"} <= set(merged["properties"])
    assert "existing" in schemas["JobAccepted"]["properties"]
    assert "existing" not in schemas["AbortAccepted"]["properties"]  # an abort enqueues nothing


async def test_the_only_undeclared_key_is_the_holders_job_key(redis: ArqRedis) -> None:
    """As docs/engine.md says for Redis Cluster: every key enqueue.lua touches is in KEYS but
    the job key of the unique key's holder, found by its id in the script."""
    unique = Unique("cluster", 60, scope="owner")
    first = await enqueue_job(redis, "noop", _unique=unique)
    declared, touched = await _script_keys(
        redis, lambda: enqueue_job(redis, "noop", _unique=unique)
    )
    assert touched - declared == {job_key_prefix + str(first)}
