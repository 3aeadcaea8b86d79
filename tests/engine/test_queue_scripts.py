"""The queue's Lua scripts (jobs/engine/queue.py) against a real Redis: claims, leases, finishes;
and every script of the project (`**/lua/*.lua`) names its KEYS and ARGV entries."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from uuid import uuid4

from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus, deserialize_job_raw
from redis.asyncio.client import Monitor

from asyncjobs.arqcompat import (
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from asyncjobs.keys import COUNTERS_KEY, waiting_key, wake_key
from jobs.engine.dependencies import enqueue_waiting
from jobs.engine.monitor import hour_key, minute_key, sample_queue
from jobs.engine.queue import (
    FINISH_BATCH,
    Claimed,
    Finish,
    claim,
    enqueue_job,
    enqueue_jobs,
    finish,
    renew_leases,
)

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


async def test_finish_writes_batches_past_one_script_call(redis: ArqRedis) -> None:
    """More jobs than FINISH_BATCH: two calls, each job's keys and fields where the script
    reads them (a slip in the per-job offsets would write one job's result under another's)."""
    count = FINISH_BATCH + 3
    await enqueue_jobs(redis, "noop", [{"_job_id": f"b{n}"} for n in range(count)])
    _, claimed, _ = await claim(redis, QUEUE, count, LEASE_MS)
    await finish(redis, QUEUE, [Finish(c.job_id, True, c.job_id.encode()) for c in claimed])
    results = await redis.mget([result_key_prefix + f"b{n}" for n in range(count)])
    assert results == [f"b{n}".encode() for n in range(count)]
    assert await redis.zcard(QUEUE) == 0


async def test_a_postponed_run_gives_its_try_back(redis: ArqRedis) -> None:
    await enqueue_job(redis, "scrape", _job_id="p")
    _, [held], _ = await claim(redis, QUEUE, 10, LEASE_MS)
    await finish(redis, QUEUE, [Finish("p", done=False, score=held.score, counts_as_try=False)])
    _, [again], _ = await claim(redis, QUEUE, 10, LEASE_MS)
    assert again.job_try == 1


async def test_the_queue_sample_keeps_the_largest_depth_and_wait_of_the_minute(
    redis: ArqRedis,
) -> None:
    now = 1_800_000_000.0  # a fixed time: the minute and hour keys are known
    await redis.zadd(QUEUE, {"old": now * 1000 - 5000, "new": now * 1000 - 10, "later": 2e12})

    async def sample(at: float) -> None:
        async with redis.pipeline(transaction=False) as pipe:
            sample_queue(pipe, QUEUE, at)
            assert await pipe.execute() == [2]  # the due jobs

    await sample(now)
    await redis.zrem(QUEUE, "old")
    await redis.zadd(QUEUE, {"other": now * 1000 - 20})
    await sample(now + 1)  # the same minute: a shorter wait leaves the maximum alone
    for key in (minute_key(now), hour_key(now)):
        fields = await redis.hgetall(key)  # type: ignore[misc]
        assert fields == {b"depth_max": b"2", b"age_max_ms": b"5000"}, key
        assert await redis.ttl(key) > 0


# --- The scripts as files, and the keys they touch (issue 29; docs/engine.md) ---------------

ROOT = Path(__file__).resolve().parents[2]
ENGINE_SCRIPTS = {"enqueue", "claim", "finish", "renew", "sample_queue"}
_ENTRY = re.compile(r"\b(KEYS|ARGV)\[([^\]]+)\]")
_LOCAL = re.compile(r"^\s*local\s+\w+(\s*,\s*\w+)*\s*=")


def _lua_files() -> list[Path]:
    found = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        if Path(folder).name == "lua":
            found += [Path(folder, name) for name in names if name.endswith(".lua")]
    return sorted(found)


def _naming_problems(text: str) -> list[str]:
    """Each KEYS[i] and ARGV[i] read in a `local` declaration; a fixed entry (a number) among
    the declarations the script opens with, and entries 1..n each named once."""
    problems: list[str] = []
    named: dict[str, list[int]] = {"KEYS": [], "ARGV": []}
    in_header = True
    for number, line in enumerate(text.splitlines(), 1):
        code = line.split("--", 1)[0]
        is_local = _LOCAL.match(code) is not None
        in_header = in_header and (is_local or not code.strip())
        for table, index in _ENTRY.findall(code):
            if not is_local:
                problems.append(f"line {number}: {table}[{index}] not read into a local")
            elif index.strip().isdigit():
                named[table].append(int(index))
                if not in_header:
                    problems.append(f"line {number}: {table}[{index}] named below the header")
    for table, indices in named.items():
        if sorted(indices) != list(range(1, len(indices) + 1)):
            problems.append(f"{table} entries named {sorted(indices)}, not 1..n once each")
    return problems


def test_every_lua_script_names_its_keys_and_arguments_at_its_top() -> None:
    scripts = _lua_files()
    engine = {p.stem for p in scripts if p.parent == ROOT / "jobs" / "engine" / "lua"}
    assert engine >= ENGINE_SCRIPTS
    problems = [
        f"{path.relative_to(ROOT)}: {problem}"
        for path in scripts
        for problem in _naming_problems(path.read_text(encoding="utf-8"))
    ]
    assert problems == []


def test_the_naming_check_catches_an_unnamed_entry() -> None:
    assert _naming_problems("local a = KEYS[1]\nlocal b = ARGV[2]\n") == [
        "ARGV entries named [2], not 1..n once each"
    ]
    assert _naming_problems("local a = KEYS[1]\nredis.call('GET', KEYS[2])\n") == [
        "line 2: KEYS[2] not read into a local"
    ]
    assert _naming_problems("return 1\nlocal a = ARGV[1]\n") == [
        "line 2: ARGV[1] named below the header"
    ]


async def test_the_scripts_touch_only_keys_passed_in_keys_except_claim(redis: ArqRedis) -> None:
    """MONITOR shows each command a script runs; COMMAND GETKEYS says which of its arguments
    are keys. Every key enqueue, enqueue_waiting (its queue's waiting index among them), renew,
    finish (of jobs no other waits on: no waiting index either) and the monitor's sample touch
    is in the call's KEYS (as Redis Cluster needs); claim's job keys are the documented
    exception."""
    await enqueue_job(redis, "noop", _job_id="t0", _priority="transactional")
    await enqueue_jobs(redis, "noop", [{"_job_id": f"t{n}"} for n in range(1, 5)])
    claimed: list[Claimed] = []

    async def claim_all() -> None:
        claimed.extend((await claim(redis, QUEUE, 10, LEASE_MS)).jobs)

    declared, touched = await _script_keys(redis, claim_all)
    ids = [c.job_id for c in claimed]
    assert sorted(ids) == [f"t{n}" for n in range(5)]
    prefixes = (in_progress_key_prefix, job_key_prefix, retry_key_prefix)
    assert touched - declared == {p + i for p in prefixes for i in ids}

    record = b'{"try": 1}'
    finishes = [
        Finish("t0", done=True, result=b"r", result_ttl_ms=60_000, try_record=record),
        Finish("t1", done=True, try_record=record, keep_in_progress_ms=5000),
        Finish("t2", done=False, score=1, try_record=record),
        Finish("t3", done=False, score=1, counts_as_try=False),
        Finish("t4", done=True, result=b"r"),
    ]

    async def sample() -> None:
        async with redis.pipeline(transaction=False) as pipe:
            sample_queue(pipe, QUEUE, time.time())
            await pipe.execute()

    steps: dict[str, Callable[[], Awaitable[object]]] = {
        "renew": lambda: renew_leases(redis, QUEUE, ids, LEASE_MS),
        "finish": lambda: finish(redis, QUEUE, finishes),
        "sample_queue": sample,
        "enqueue": lambda: enqueue_job(redis, "noop", _job_id="t5"),
        "enqueue_waiting": lambda: enqueue_waiting(
            redis, "noop", ["t5"], {"_job_id": "w5"}, kind="after"
        ),
    }
    for name, step in steps.items():  # one script call each: its keys checked on their own
        declared, touched = await _script_keys(redis, step)
        assert touched, f"{name}: no command seen"
        assert touched <= declared, (name, touched - declared)
    assert await redis.zscore(waiting_key(QUEUE), "w5") is not None


async def _script_keys(
    redis: ArqRedis, step: Callable[[], Awaitable[object]]
) -> tuple[set[str], set[str]]:
    """(the keys of the script calls `step` makes, the keys their commands touched)."""
    db = redis.connection_pool.connection_kwargs.get("db", 0)
    marker = f"end-{uuid4().hex}"
    calls, inner = [], []
    async with redis.monitor() as monitor:
        await step()
        await redis.get(marker)
        while (line := await _monitored(monitor, db)) != ["tcp", "GET", marker]:
            client, *command = line
            if client == "lua":
                inner.append(command)
            elif command and command[0].upper() in ("EVAL", "EVALSHA"):
                calls.append(command)
    return await _keys_of(redis, calls), await _keys_of(redis, inner)


async def _monitored(monitor: Monitor, db: int) -> list[str]:
    """The next command MONITOR shows in database `db`: ["lua" or "tcp", name, *arguments]."""
    assert monitor.connection is not None
    while True:
        raw = await monitor.connection.read_response()
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        match = Monitor.monitor_re.match(text.split(" ", 1)[1])
        assert match is not None, text
        if int(match[1]) == db:
            client = "lua" if match[2] == "lua" else "tcp"
            return [client, *Monitor.command_re.findall(match[3])]


async def _keys_of(redis: ArqRedis, commands: list[list[str]]) -> set[str]:
    keys: set[str] = set()
    for command in commands:
        found = await redis.execute_command("COMMAND GETKEYS", *command)  # type: ignore[no-untyped-call]
        keys.update(k.decode() if isinstance(k, bytes) else k for k in found)
    return keys
