"""The queue's Redis operations as Lua scripts: enqueue one job, claim a batch, finish a batch.

The data layout is arq 0.28's (job, in-progress, retry and result keys, the queue sorted set,
the abort set), so arq's own `enqueue_job`, `Job` and our status reads keep working. What
differs is the number of round trips: arq enqueues with WATCH/MULTI (4 round trips), claims each
job with WATCH/EXISTS/ZSCORE/MULTI/PSETEX/EXEC then MULTI/GET/INCR/EXPIRE/ZREM/EXEC and finishes
each with its own MULTI/EXEC; here each of the three is one script call, claims and finishes for
many jobs at once.

One change of meaning: a claimed job's score in the queue is pushed to the end of its lease
(a "visibility timeout"), and the worker renews both the score and the in-progress key while the
job runs. So a claim reads only jobs nobody runs, instead of stepping over every running job at
the head of the queue, and a dead worker's jobs become due again when their lease ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple
from uuid import uuid4

from arq.connections import ArqRedis
from arq.jobs import serialize_job
from redis.asyncio import Redis

from asyncjobs.arqcompat import (
    abort_jobs_ss,
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
    timestamp_ms,
    to_ms,
)
from asyncjobs.keys import (
    COUNTERS_KEY,
    TRIES_KEPT,
    TRIES_KEY_PREFIX,
    bulk_turn_key,
    transactional_key,
    wake_key,
)
from asyncjobs.redis import execute_replicated
from asyncjobs.registry import PRIORITIES, Priority
from asyncjobs.settings import Settings

RETRY_KEY_TTL_S = 88400  # arq's
# A completion webhook's URL, carried in the job's kwargs beside arq's options; the runner
# takes it out before the job's function sees its arguments (jobs.webhooks sends it).
CALLBACK_KWARG = "_callback_url"
# The API key a job was enqueued for (its id, as app/auth.py names keys), carried the same way:
# the runner hands it to the job's context, and the CPU pool takes turns between owners.
OWNER_KWARG = "_owner"
FINISH_BATCH = 200  # jobs per finish script call: bounds how long Redis runs one script
KEEP_AFTER_NEXT_TRY_MS = 24 * 3600 * 1000  # arq's expires_extra_ms
# While transactional and bulk jobs both wait, one claim in this many takes a bulk job.
BULK_SHARE_EVERY = 10


# KEYS: job, result, queue, counters, wake, transactional index. ARGV: job bytes, expires ms,
# score, job id, counter, "1" for a transactional job.
_ENQUEUE = """
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
if ARGV[6] == '1' then redis.call('ZADD', KEYS[6], ARGV[3], ARGV[4]) end
redis.call('HINCRBY', KEYS[4], ARGV[5], 1)
if redis.call('LLEN', KEYS[5]) == 0 then redis.call('LPUSH', KEYS[5], 1) end
return 1
"""

# KEYS: queue, abort set, transactional index, share counter. ARGV: now ms, how many to claim,
# lease ms, then the prefixes of the in-progress, job and retry keys, the retry key's TTL, and
# one claim in how many goes to a bulk job while both classes wait.
# Returns {abort ids, claimed, next score}: claimed flat (id, score, job bytes or false, try,
# aborted); next score, the earliest in the queue after now (a deferred job's time, or a lease's
# end), or false.
#
# Priorities: the queue holds every job; the transactional index holds the ids of transactional
# jobs as a hint, checked against the queue here (a finished job's entry is dropped, a running
# or deferred one's moved to its queue score), so no other script has to keep it exact.
_CLAIM = """
local now, limit, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local bulk_every = tonumber(ARGV[8])
local aborts = {}
local abort_count = redis.call('ZCARD', KEYS[2])
if abort_count > 0 then aborts = redis.call('ZRANGE', KEYS[2], 0, -1) end
local claimed = {}
if limit > 0 then
  local urgent, bulk = {}, {}
  local has_urgent = redis.call('ZCARD', KEYS[3]) > 0
  if has_urgent then
    local hints = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 2 * limit)
    for _, id in ipairs(hints) do
      local score = redis.call('ZSCORE', KEYS[1], id)
      if not score then
        redis.call('ZREM', KEYS[3], id)
      elseif tonumber(score) > now then
        redis.call('ZADD', KEYS[3], score, id)
      else
        urgent[#urgent + 1] = {id, score}
      end
    end
  end
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES',
                        'LIMIT', 0, limit + #urgent)
  for i = 1, #due, 2 do
    local hint = has_urgent and redis.call('ZSCORE', KEYS[3], due[i])
    if not hint then
      bulk[#bulk + 1] = {due[i], due[i + 1]}
    elseif tonumber(hint) > now then  -- a transactional job due before its hint said
      redis.call('ZADD', KEYS[3], due[i + 1], due[i])
      urgent[#urgent + 1] = {due[i], due[i + 1]}
    end
  end
  local turn = tonumber(redis.call('GET', KEYS[4]) or '0')
  local u, b, picks = 1, 1, {}
  while #picks < limit and (u <= #urgent or b <= #bulk) do
    local take_bulk = u > #urgent
    if u <= #urgent and b <= #bulk then
      turn = turn + 1
      take_bulk = turn % bulk_every == 0
    end
    if take_bulk then
      picks[#picks + 1] = bulk[b]; b = b + 1
    else
      picks[#picks + 1] = urgent[u]; u = u + 1
    end
  end
  redis.call('SET', KEYS[4], turn % bulk_every)
  for _, pick in ipairs(picks) do
    local id = pick[1]
    if redis.call('SET', ARGV[4] .. id, '1', 'NX', 'PX', lease) then
      redis.call('ZADD', KEYS[1], 'XX', now + lease, id)
      if has_urgent then redis.call('ZADD', KEYS[3], 'XX', now + lease, id) end
      local retry_key = ARGV[6] .. id
      local try = redis.call('INCR', retry_key)
      if try == 1 then redis.call('EXPIRE', retry_key, ARGV[7]) end
      local aborted = 0
      if abort_count > 0 then aborted = redis.call('ZREM', KEYS[2], id) end
      local n = #claimed
      claimed[n + 1] = id
      claimed[n + 2] = pick[2]
      claimed[n + 3] = redis.call('GET', ARGV[5] .. id)
      claimed[n + 4] = try
      claimed[n + 5] = aborted
    end
  end
end
local next_due = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf',
                           'WITHSCORES', 'LIMIT', 0, 1)
return {aborts, claimed, next_due[2] or false}
"""

# KEYS: queue, abort set, transactional index. ARGV: the prefixes of the in-progress, job, retry
# and result keys, now
# (ms), how long past its next try a job's data is kept (ms), the tries list's prefix and how many
# it keeps, then seven fields per job: id, "done", "again" or "later" (again, but this run was
# not a try: see asyncjobs.errors.Postpone), result bytes ("" for none), result TTL ms (0: for
# ever), new score (for "again"), ms to keep the in-progress key (0: delete it), the try's JSON
# record ("" for none), appended to the job's tries list, which expires with its result.
# A job put back for a later try keeps its data and its try count at least until then: arq sets
# their TTLs once (a day), and an email retried for two days would otherwise vanish midway.
_FINISH = """
local check_abort = redis.call('ZCARD', KEYS[2]) > 0
local now, extra, kept = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[8])
for i = 9, #ARGV, 7 do
  local id, mode, result = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local result_ttl, score, keep = tonumber(ARGV[i + 3]), ARGV[i + 4], tonumber(ARGV[i + 5])
  local in_progress, tries, record = ARGV[1] .. id, ARGV[7] .. id, ARGV[i + 6]
  if record ~= '' and redis.call('RPUSH', tries, record) > kept then
    redis.call('LTRIM', tries, -kept, -1)
  end
  if keep > 0 then redis.call('PEXPIRE', in_progress, keep) end
  if mode == 'done' then
    if result ~= '' then
      if result_ttl > 0 then
        redis.call('SET', ARGV[4] .. id, result, 'PX', result_ttl)
      else
        redis.call('SET', ARGV[4] .. id, result)
      end
    end
    if keep > 0 then
      redis.call('DEL', ARGV[2] .. id, ARGV[3] .. id)
    else
      redis.call('DEL', in_progress, ARGV[2] .. id, ARGV[3] .. id)
    end
    if check_abort then redis.call('ZREM', KEYS[2], id) end
    redis.call('ZREM', KEYS[1], id)
    if record == '' then  -- nothing written for this job (its first try, no result kept)
    elseif result == '' then
      redis.call('DEL', tries)  -- no result kept: no job page to show them on
    elseif result_ttl > 0 then
      redis.call('PEXPIRE', tries, result_ttl)
    else
      redis.call('PERSIST', tries)
    end
  else
    redis.call('ZADD', KEYS[1], 'XX', score, id)
    redis.call('ZADD', KEYS[3], 'XX', score, id)
    if keep == 0 then redis.call('DEL', in_progress) end
    if mode == 'later' and tonumber(redis.call('GET', ARGV[3] .. id) or '0') > 0 then
      redis.call('DECR', ARGV[3] .. id)
    end
    local until_ms = tonumber(score) - now + extra
    for _, key in ipairs({ARGV[2] .. id, ARGV[3] .. id}) do
      local ttl = redis.call('PTTL', key)
      if ttl >= 0 and ttl < until_ms then redis.call('PEXPIRE', key, until_ms) end
    end
    if record ~= '' then redis.call('PEXPIRE', tries, until_ms) end
  end
end
return #ARGV
"""

# KEYS: queue, transactional index. ARGV: the leases' end (ms), lease ms, the in-progress
# prefix, then job ids.
_RENEW = """
for i = 4, #ARGV do
  if redis.call('PEXPIRE', ARGV[3] .. ARGV[i], ARGV[2]) == 1 then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[1], ARGV[i])
    redis.call('ZADD', KEYS[2], 'XX', ARGV[1], ARGV[i])
  end
end
return 1
"""

_PREFIXES = (in_progress_key_prefix, job_key_prefix, retry_key_prefix)


class QueueScripts:
    """The scripts, registered on one client (redis-py loads them again after a restart)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.enqueue = redis.register_script(_ENQUEUE)
        self.claim = redis.register_script(_CLAIM)
        self.finish = redis.register_script(_FINISH)
        self.renew = redis.register_script(_RENEW)


def scripts_for(redis: Redis) -> QueueScripts:
    """Registered once per client (kept on it), so each script's SHA is computed once."""
    scripts = getattr(redis, "_asyncjobs_scripts", None)
    if scripts is None:
        scripts = QueueScripts(redis)
        redis._asyncjobs_scripts = scripts  # type: ignore[attr-defined]
    return scripts


async def enqueue_job(redis: ArqRedis, function: str, /, **kwargs: Any) -> str | None:
    """arq's `enqueue_job` in one round trip, which also counts the job for the metrics and
    wakes a waiting worker: the new job's id, or None if a job with `_job_id` exists.
    Takes arq's options: `_job_id`, `_queue_name`, `_defer_by`, `_expires`, `_job_try`,
    `_priority` ("bulk" unless it says "transactional": ahead of bulk, see _CLAIM), and
    `_replicated` (the settings: with REDIS_WAIT_REPLICAS, return only once replicas have the
    job, else NotReplicatedError)."""
    settings: Settings | None = kwargs.pop("_replicated", None)
    job_id, keys, args = _enqueue_call(redis, function, kwargs)
    if settings is None or not settings.redis_wait_replicas:
        added = await scripts_for(redis).enqueue(keys=keys, args=args)
    else:  # WAIT on the enqueue's own connection: a pipeline of the two
        async with redis.pipeline(transaction=False) as pipe:
            await scripts_for(redis).enqueue(keys=keys, args=args, client=pipe)
            [added] = await execute_replicated(pipe, settings)
    return job_id if added else None


async def enqueue_jobs(
    redis: ArqRedis,
    function: str,
    calls: Sequence[dict[str, Any]],
    replicated: Settings | None = None,
) -> list[str | None]:
    """`enqueue_job` for many jobs of one function, in one pipelined round trip (and, with
    `replicated` settings asking for it, a WAIT for replicas at its end)."""
    script = scripts_for(redis).enqueue
    ids = []
    async with redis.pipeline(transaction=False) as pipe:
        for kwargs in calls:
            job_id, keys, args = _enqueue_call(redis, function, dict(kwargs))
            await script(keys=keys, args=args, client=pipe)
            ids.append(job_id)
        added = await (execute_replicated(pipe, replicated) if replicated else pipe.execute())
    return [job_id if ok else None for job_id, ok in zip(ids, added, strict=True)]


def _enqueue_call(
    redis: ArqRedis, function: str, kwargs: dict[str, Any]
) -> tuple[str, list[str], list[Any]]:
    """(job id, keys, arguments) of the enqueue script for one job; takes arq's options out of
    `kwargs`, leaving the job's own arguments."""
    job_id: str = kwargs.pop("_job_id", None) or uuid4().hex
    queue: str = kwargs.pop("_queue_name", None) or redis.default_queue_name
    defer_ms = to_ms(kwargs.pop("_defer_by", None)) or 0
    expires_ms = to_ms(kwargs.pop("_expires", None))
    job_try: int | None = kwargs.pop("_job_try", None)
    priority: Priority = kwargs.pop("_priority", None) or "bulk"
    if priority not in PRIORITIES:
        raise ValueError(f"_priority must be one of {PRIORITIES}, not {priority!r}")
    if "_defer_until" in kwargs:
        raise TypeError("enqueue_job takes _defer_by, not _defer_until")
    enqueued_ms = timestamp_ms()
    score = enqueued_ms + defer_ms
    job = serialize_job(function, (), kwargs, job_try, enqueued_ms, serializer=redis.job_serializer)
    keys = [
        job_key_prefix + job_id,
        result_key_prefix + job_id,
        queue,
        COUNTERS_KEY,
        wake_key(queue),
        transactional_key(queue),
    ]
    expires = expires_ms or defer_ms + redis.expires_extra_ms
    urgent = "1" if priority == "transactional" else "0"
    return job_id, keys, [job, expires, score, job_id, f"enqueued|{function}", urgent]


def waiting_counts(due: int, not_due: int, running: int) -> tuple[int, int]:
    """(queued, deferred) from ZCOUNTs of the queue up to now and after now: a running job's
    score is the end of its lease, so it is among the ones after now, not a deferred job."""
    return due, max(0, not_due - running)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A job this worker now holds: its lease is set, its try counted."""

    job_id: str
    score: int
    raw: bytes | None  # None: the job's data expired before anyone ran it
    job_try: int
    aborted: bool  # aborted while queued: finish it without running it


class Claims(NamedTuple):
    aborts: list[str]  # the ids in the abort set (usually none)
    jobs: list[Claimed]
    next_due_ms: int | None  # the earliest score in the queue after now, if any


async def claim(redis: Redis, queue: str, limit: int, lease_ms: int) -> Claims:
    """Claim up to `limit` due jobs, transactional ones first (bulk keeps one claim in
    BULK_SHARE_EVERY while both wait)."""
    args: list[str | int] = [
        timestamp_ms(),
        limit,
        lease_ms,
        *_PREFIXES,
        RETRY_KEY_TTL_S,
        BULK_SHARE_EVERY,
    ]
    keys = [queue, abort_jobs_ss, transactional_key(queue), bulk_turn_key(queue)]
    aborts, flat, next_due = await scripts_for(redis).claim(keys=keys, args=args)
    claimed = [
        Claimed(
            job_id=flat[i].decode(),
            score=int(float(flat[i + 1])),
            raw=flat[i + 2],
            job_try=int(flat[i + 3]),
            aborted=bool(flat[i + 4]),
        )
        for i in range(0, len(flat), 5)
    ]
    return Claims([a.decode() for a in aborts], claimed, int(float(next_due)) if next_due else None)


@dataclass(frozen=True, slots=True)
class Finish:
    """How one try of a job ends in Redis."""

    job_id: str
    done: bool  # True: out of the queue (result kept); False: back in it at `score`
    result: bytes | None = None
    result_ttl_ms: int = 0  # 0: keep the result for ever
    score: int = 0
    keep_in_progress_ms: int = 0  # cron jobs keep their in-progress key a while (arq's rule)
    counts_as_try: bool = True  # False: a postponed run, the job's try count is given back
    try_record: bytes = b""  # JSON: this try for the job's tries list (b"": none)

    def fields(self) -> tuple[str, str, bytes, int, int, int, bytes]:
        mode = "done" if self.done else "again" if self.counts_as_try else "later"
        result = self.result or b""
        return (
            self.job_id, mode, result, self.result_ttl_ms, self.score,
            self.keep_in_progress_ms, self.try_record,
        )  # fmt: skip


async def finish(redis: Redis, queue: str, finishes: Sequence[Finish]) -> None:
    """Write how each job ended, FINISH_BATCH at a time."""
    script = scripts_for(redis).finish
    for start in range(0, len(finishes), FINISH_BATCH):
        args: list[Any] = [
            *_PREFIXES, result_key_prefix, timestamp_ms(), KEEP_AFTER_NEXT_TRY_MS,
            TRIES_KEY_PREFIX, TRIES_KEPT,
        ]  # fmt: skip
        for item in finishes[start : start + FINISH_BATCH]:
            args.extend(item.fields())
        await script(keys=[queue, abort_jobs_ss, transactional_key(queue)], args=args)


async def renew_leases(redis: Redis, queue: str, job_ids: Iterable[str], lease_ms: int) -> None:
    """Keep the jobs this worker runs hidden and marked in progress for another lease. A job
    whose in-progress key is gone has just finished: its score is left alone."""
    ids = list(job_ids)
    if ids:
        args: list[str | int] = [timestamp_ms() + lease_ms, lease_ms, in_progress_key_prefix, *ids]
        await scripts_for(redis).renew(keys=[queue, transactional_key(queue)], args=args)
