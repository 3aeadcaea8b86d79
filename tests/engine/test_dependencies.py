"""Jobs that wait for jobs (jobs/engine/dependencies.py), with a real worker and real Redis:
`after` (all completed, or one failed: cancelled, or run anyway with allow_failure), `then`
(the parent's result handed over) and a batch's callback (once, with the counts by outcome)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from arq.connections import ArqRedis
from arq.jobs import Job
from arq.typing import WorkerCoroutine
from arq.worker import func

from asyncjobs.keys import DEPENDENTS_KEY_PREFIX, ENDED_KEY_PREFIX
from asyncjobs.settings import Settings
from jobs.engine.dependencies import (
    Dependencies,
    FollowUp,
    UnknownParent,
    enqueue_callback,
    enqueue_waiting,
    enqueue_with,
    read_waits,
)
from jobs.engine.queue import enqueue_job, enqueue_jobs
from tests.conftest import AUTH, start_worker, stop_worker
from tests.helpers import ApiClient, wait_for

RUNS: list[tuple[str, Any]] = []


async def double(ctx: dict[str, Any], x: int = 0, **extra: Any) -> int:
    RUNS.append(("double", x))
    return 2 * x


async def boom(ctx: dict[str, Any], **extra: Any) -> None:
    raise ValueError("it broke")


async def record(ctx: dict[str, Any], **kwargs: Any) -> str:
    RUNS.append(("record", kwargs))
    return "recorded"


async def slow(ctx: dict[str, Any], **extra: Any) -> str:
    await asyncio.sleep(0.3)
    return "slow"


FUNCTIONS = [func(cast(WorkerCoroutine, f)) for f in (double, boom, record, slow)]


async def result_of(redis: ArqRedis, job_id: str, timeout: float = 15) -> Any:
    job = Job(job_id, redis)

    async def done() -> Any:
        return await job.result_info()

    return await wait_for(done, timeout=timeout, what=f"job {job_id} to finish")


@pytest.fixture
async def worker(settings: Settings, redis: ArqRedis) -> Any:
    RUNS.clear()
    running, task = await start_worker(settings, functions=FUNCTIONS, cron_jobs=[])
    yield running
    await stop_worker(running, task)


async def test_after_waits_until_every_parent_completed(redis: ArqRedis, worker: Any) -> None:
    await enqueue_job(redis, "slow", _job_id="p1")
    await enqueue_job(redis, "double", x=1, _job_id="p2")
    deps = Dependencies(after=("p1", "p2"))
    child = await enqueue_with(redis, "record", {"_job_id": "c", "tag": "after"}, deps)
    assert child == "c"
    waits = await read_waits(redis, "c")
    assert waits is not None and waits.state == "waiting" and waits.total == 2
    info = await result_of(redis, "c")
    parents = [await result_of(redis, p) for p in ("p1", "p2")]
    assert info.success and info.start_time >= max(p.finish_time for p in parents)
    assert RUNS.count(("record", {"tag": "after"})) == 1  # the marker argument is taken out


async def test_a_parent_that_failed_cancels_its_dependent_with_its_reason(
    redis: ArqRedis, worker: Any
) -> None:
    await enqueue_job(redis, "boom", _job_id="bad")
    await enqueue_with(redis, "record", {"_job_id": "c"}, Dependencies(after=("bad",)))
    info = await result_of(redis, "c")
    assert not info.success
    assert str(info.result) == "cancelled: job bad failed: it broke"
    assert not [run for run in RUNS if run[0] == "record"]  # it never ran


async def test_allow_failure_runs_it_anyway(redis: ArqRedis, worker: Any) -> None:
    await enqueue_job(redis, "boom", _job_id="bad")
    deps = Dependencies(after=("bad",), allow_failure=True)
    await enqueue_with(redis, "record", {"_job_id": "c"}, deps)
    assert (await result_of(redis, "c")).success


async def test_after_a_job_that_has_ended_resolves_at_enqueue(redis: ArqRedis, worker: Any) -> None:
    await enqueue_job(redis, "double", x=3, _job_id="done")
    await enqueue_job(redis, "boom", _job_id="bad")
    await result_of(redis, "done")
    await result_of(redis, "bad")
    # a completion is told by its kept result, a failure by its ended marker (finish.lua)
    assert not await redis.exists(ENDED_KEY_PREFIX + "done")
    assert await redis.exists(ENDED_KEY_PREFIX + "bad")
    await enqueue_with(redis, "record", {"_job_id": "c"}, Dependencies(after=("done",)))
    assert (await result_of(redis, "c")).success
    await enqueue_with(redis, "record", {"_job_id": "d"}, Dependencies(after=("done", "bad")))
    assert str((await result_of(redis, "d")).result) == "cancelled: job bad failed: it broke"
    with pytest.raises(UnknownParent, match="no job nobody"):
        await enqueue_with(redis, "record", {}, Dependencies(after=("nobody",)))


async def test_then_runs_once_with_the_parents_result_and_chains(
    redis: ArqRedis, worker: Any
) -> None:
    third = FollowUp("record", {}, argument="previous")
    second = FollowUp("double", {}, argument="x", then=third)
    job_id = await enqueue_with(
        redis, "double", {"x": 5, "_job_id": "a"}, Dependencies(then=second)
    )
    assert job_id == "a"
    assert (await result_of(redis, "a-then")).result == 20
    assert (await result_of(redis, "a-then-then")).result == "recorded"
    assert ("record", {"previous": 20}) in RUNS
    again = await enqueue_with(redis, "double", {"x": 5, "_job_id": "a"}, Dependencies(then=second))
    assert again is None  # the same ids: nothing enqueued twice


async def test_a_batch_callback_runs_once_with_the_counts(redis: ArqRedis, worker: Any) -> None:
    ids = [f"b-{n}" for n in range(50)]
    calls = [{"x": n, "_job_id": job_id} for n, job_id in enumerate(ids[:45])]
    await enqueue_jobs(redis, "double", calls)
    await enqueue_jobs(redis, "boom", [{"_job_id": job_id} for job_id in ids[45:]])
    callback = await enqueue_callback(redis, "b", ids, FollowUp("record", {}, argument="batch"))
    assert callback == "b-callback"
    assert (await result_of(redis, callback)).success
    summary = {"batch_id": "b", "total": 50, "counts": {"complete": 45, "failed": 5, "aborted": 0}}
    assert [run for run in RUNS if run[0] == "record"] == [("record", {"batch": summary})]
    for job_id in ids:  # each parent's dependents set went with its finish
        assert not await redis.exists(DEPENDENTS_KEY_PREFIX + job_id)


async def test_a_waiting_job_is_not_in_the_queue_and_refuses_a_taken_id(
    redis: ArqRedis, settings: Settings
) -> None:
    """No worker: the parent never ends."""
    await enqueue_job(redis, "double", _job_id="p")
    assert await enqueue_waiting(redis, "record", ["p"], {"_job_id": "w"}, kind="after") == "w"
    assert await enqueue_waiting(redis, "record", ["p"], {"_job_id": "w"}, kind="after") is None
    assert await redis.zscore(settings.queue_name, "w") is None
    assert await redis.smembers(DEPENDENTS_KEY_PREFIX + "p") == {b"w"}  # type: ignore[misc]


async def test_the_api_shows_a_waiting_job_and_what_it_waits_for(
    api: ApiClient, redis: ArqRedis
) -> None:
    """No worker: POST /jobs/email with `after`, its status, an abort; bad options are 422s."""
    email = {"to": "someone@example.com", "subject": "Hi", "text": "Hello"}
    await enqueue_job(redis, "noop", _job_id="parent")
    response = await api.post("/jobs/email", json=email | {"after": ["parent"]}, headers=AUTH)
    assert response.status == 202, await response.text()
    job_id = (await response.json())["job_id"]
    view = await (await api.get(f"/jobs/{job_id}", headers=AUTH)).json()
    assert view["status"] == "waiting"
    assert view["waiting_for"] == {
        "kind": "after", "job_ids": ["parent"], "batch_id": None, "pending": 1, "total": 1,
    }  # fmt: skip
    unknown = await api.post("/jobs/email", json=email | {"after": ["nobody"]}, headers=AUTH)
    assert unknown.status == 422 and "no job nobody" in await unknown.text()
    bad_then = email | {"then": {"type": "no_such_type"}}
    assert (await api.post("/jobs/email", json=bad_then, headers=AUTH)).status == 422
    assert (await api.delete(f"/jobs/{job_id}", headers=AUTH)).status == 202
    waits = await read_waits(redis, job_id)
    assert waits is not None and waits.state == "aborted"  # no parent's end releases it now
