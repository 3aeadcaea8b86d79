"""The queue's Lua scripts (jobs/engine/queue.py) against a real Redis: claims, leases, finishes."""

from __future__ import annotations

import time

from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus, deserialize_job_raw

from asyncjobs.arqcompat import (
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from asyncjobs.keys import COUNTERS_KEY, wake_key
from jobs.engine.queue import Finish, claim, enqueue_job, enqueue_jobs, finish, renew_leases

QUEUE = "arq:queue"
LEASE_MS = 15_000


async def test_enqueue_writes_an_arq_job_counts_it_and_wakes_one_worker(redis: ArqRedis) -> None:
    first = await enqueue_job(redis, "send_email", to="a@example.com", _job_id="j1")
    again = await enqueue_job(redis, "send_email", to="b@example.com", _job_id="j1")
    other = await enqueue_job(redis, "noop")
    assert (first, again) == ("j1", None)  # an existing id is refused, as arq refuses it
    assert other is not None and other != "j1"
    raw = await redis.get(job_key_prefix + "j1")
    function, args, kwargs, _, _ = deserialize_job_raw(raw)
    assert (function, args, kwargs) == ("send_email", (), {"to": "a@example.com"})
    assert await Job("j1", redis).status() == JobStatus.queued  # arq reads it as its own
    assert await redis.hget(COUNTERS_KEY, "enqueued|send_email") == b"1"  # type: ignore[misc]
    assert await redis.llen(wake_key(QUEUE)) == 1  # type: ignore[misc]  # one wake-up at most


async def test_a_claimed_job_is_hidden_until_its_lease_ends(redis: ArqRedis) -> None:
    await enqueue_job(redis, "noop", _job_id="a")
    await enqueue_job(redis, "noop", _job_id="b")
    aborts, claimed, _ = await claim(redis, QUEUE, 10, LEASE_MS)
    assert aborts == []
    assert [(c.job_id, c.job_try, c.aborted) for c in claimed] == [
        ("a", 1, False),
        ("b", 1, False),
    ]
    assert claimed[0].raw is not None
    score = await redis.zscore(QUEUE, "a")
    assert score is not None and score > time.time() * 1000 + LEASE_MS - 5000
    assert await redis.pttl(in_progress_key_prefix + "a") > LEASE_MS - 5000
    assert (await claim(redis, QUEUE, 10, LEASE_MS))[1] == []  # nobody takes a held job

    # The worker dies: both marks run out; the job is due again and its try counts.
    await redis.delete(in_progress_key_prefix + "a")
    await redis.zadd(QUEUE, {"a": 0})
    _, again, _ = await claim(redis, QUEUE, 10, LEASE_MS)
    assert [(c.job_id, c.job_try) for c in again] == [("a", 2)]


async def test_claim_takes_no_more_than_the_free_slots(redis: ArqRedis) -> None:
    for n in range(5):
        await enqueue_job(redis, "noop", _job_id=f"j{n}")
    _, first, _ = await claim(redis, QUEUE, 2, LEASE_MS)
    _, second, _ = await claim(redis, QUEUE, 10, LEASE_MS)
    assert [c.job_id for c in first] == ["j0", "j1"]
    assert [c.job_id for c in second] == ["j2", "j3", "j4"]


async def test_a_job_aborted_while_queued_is_claimed_as_aborted(redis: ArqRedis) -> None:
    await enqueue_job(redis, "noop", _job_id="x")
    await redis.zadd("arq:abort", {"x": time.time() * 1000, "elsewhere": time.time() * 1000})
    aborts, claimed, _ = await claim(redis, QUEUE, 10, LEASE_MS)
    assert sorted(aborts) == ["elsewhere", "x"]
    assert [(c.job_id, c.aborted) for c in claimed] == [("x", True)]
    assert await redis.zrange("arq:abort", 0, -1) == [b"elsewhere"]


async def test_finish_done_keeps_the_result_and_clears_the_job(redis: ArqRedis) -> None:
    await enqueue_job(redis, "noop", _job_id="d")
    await claim(redis, QUEUE, 10, LEASE_MS)
    await finish(redis, QUEUE, [Finish("d", done=True, result=b"r", result_ttl_ms=60_000)])
    assert await redis.get(result_key_prefix + "d") == b"r"
    assert 0 < await redis.pttl(result_key_prefix + "d") <= 60_000
    assert await redis.exists(job_key_prefix + "d", in_progress_key_prefix + "d") == 0
    assert await redis.zscore(QUEUE, "d") is None


async def test_finish_again_puts_the_job_back_at_its_score(redis: ArqRedis) -> None:
    await enqueue_job(redis, "noop", _job_id="r")
    _, [held], _ = await claim(redis, QUEUE, 10, LEASE_MS)
    await finish(redis, QUEUE, [Finish("r", done=False, score=held.score)])
    assert await redis.zscore(QUEUE, "r") == held.score
    assert await redis.exists(in_progress_key_prefix + "r") == 0
    _, [retried], _ = await claim(redis, QUEUE, 10, LEASE_MS)
    assert (retried.job_id, retried.job_try) == ("r", 2)


async def test_renewal_extends_running_jobs_and_leaves_finished_ones(redis: ArqRedis) -> None:
    await enqueue_job(redis, "noop", _job_id="running")
    await enqueue_job(redis, "noop", _job_id="retried")
    _, held, _ = await claim(redis, QUEUE, 10, 1000)
    retry_at = int(time.time() * 1000) + 60_000
    await finish(redis, QUEUE, [Finish("retried", done=False, score=retry_at)])
    await renew_leases(redis, QUEUE, [c.job_id for c in held], LEASE_MS)
    assert await redis.pttl(in_progress_key_prefix + "running") > 1000
    running_score = await redis.zscore(QUEUE, "running")
    assert running_score is not None and running_score > time.time() * 1000 + 5000
    assert await redis.zscore(QUEUE, "retried") == retry_at  # not hidden again by the renewal


async def test_a_job_costs_fewer_redis_commands_than_plain_arq(redis: ArqRedis) -> None:
    """Enqueue, claim and finish 100 jobs: commands per job from INFO commandstats (arq 0.28
    needs 23 for the same life: 7 to enqueue, 12 to claim, 6 to finish, minus shared polls)."""
    before = await _command_calls(redis)
    ids = [await enqueue_job(redis, "noop") for _ in range(100)]
    _, claimed, _ = await claim(redis, QUEUE, 100, LEASE_MS)
    await finish(redis, QUEUE, [Finish(c.job_id, done=True, result=b"r") for c in claimed])
    per_job = (await _command_calls(redis) - before - 2) / len(ids)  # minus the two INFO calls
    assert len(claimed) == 100
    assert per_job < 16, per_job


async def _command_calls(redis: ArqRedis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


async def test_enqueue_many_is_one_pipeline_and_refuses_taken_ids(redis: ArqRedis) -> None:
    await enqueue_job(redis, "noop", _job_id="taken")
    ids = await enqueue_jobs(redis, "scrape", [{"n": 1}, {"n": 2, "_job_id": "taken"}, {"n": 3}])
    assert ids[1] is None and ids[0] and ids[2] and ids[0] != ids[2]
    assert await redis.zcard(QUEUE) == 3
    raw = await redis.get(job_key_prefix + str(ids[2]))
    assert deserialize_job_raw(raw)[:3] == ("scrape", (), {"n": 3})
    assert await redis.hget(COUNTERS_KEY, "enqueued|scrape") == b"2"  # type: ignore[misc]


async def test_a_job_put_back_for_a_later_try_keeps_its_data_until_then(
    redis: ArqRedis,
) -> None:
    """arq gives a job's data a TTL once (a day past its due time); an email retried for two
    days must not lose its data or its try count between tries."""
    await enqueue_job(redis, "send_email", _job_id="late", _expires=60)  # data: 60 s to live
    await enqueue_job(redis, "send_email", _job_id="soon")
    _, claimed, _ = await claim(redis, QUEUE, 10, LEASE_MS)
    next_try = int(time.time() * 1000) + 36 * 3600 * 1000  # in 36 hours
    await finish(redis, QUEUE, [Finish(c.job_id, done=False, score=next_try) for c in claimed])
    for job_id in ("late", "soon"):
        for key in (job_key_prefix + job_id, retry_key_prefix + job_id):
            ttl_ms = await redis.pttl(key)
            assert ttl_ms > next_try - time.time() * 1000, (key, ttl_ms)
    assert await redis.zscore(QUEUE, "late") == next_try
