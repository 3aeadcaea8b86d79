"""Jobs that wait for other jobs: `after` (start once these jobs have completed), `then` (a
follow-up enqueued with this job, run with its result once it completes) and a batch's callback
(runs once when all the batch's jobs have ended, with the counts by outcome).

A waiting job's record is written as any job's (arq's job key), but it is not put in the queue.
Its waits hash (`asyncjobs:waits:<id>`) holds how many parents are pending, the counts by outcome
and, if a parent failed, which one; each pending parent's dependents set
(`asyncjobs:dependents:<parent>`) names it, and so does its queue's waiting index
(`asyncjobs:waiting:<queue>`, by enqueue time: the dashboard's list of waiting jobs, which are
in no other index) until it is released, cancelled or aborted. The parent's finish script
(finish.lua) releases its dependents in the same call that writes its end, so a worker killed
at any moment leaves either the parent unfinished (it runs again, and its finish releases them
then) or finished and its dependents released: never both twice, never neither. Settling
costs O(1) Redis work per finished parent (one set read, two hash increments per dependent),
however big the batch.

A newsletter's callback waits on a count instead (enqueue_counted_callback): its messages are
enqueued as the newsletter runs, so no parent list exists when it is written. Its waits hash
is the same, with no dependents set naming it; the script that records each message's outcome
(jobs/mail/lua/batch_record.lua) releases it when the last one is recorded.

The job carries a marker argument (WAITS_KWARG, beside `_callback_url`) that the runner takes
out before the function sees its arguments: the runner reads the waits hash once, then either
ends the job as failed without running it (a parent failed for good: "cancelled: ...") or
hands it what it waited for (`take_hand_off`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from arq.connections import ArqRedis
from arq.jobs import deserialize_result
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from asyncjobs.arqcompat import (
    JobExecutionFailed,
    job_key_prefix,
    result_key_prefix,
    timestamp_ms,
)
from asyncjobs.keys import (
    COUNTERS_KEY,
    DEPENDENTS_KEY_PREFIX,
    ENDED_KEY_PREFIX,
    WAITS_KEY_PREFIX,
    transactional_key,
    waiting_key,
    wake_key,
)
from asyncjobs.luascript import Arg, LuaScript
from jobs.engine.queue import OWNER_KWARG, _Enqueue, _enqueue_call, enqueue_job

# How the API hands a job's Dependencies to app.actions.enqueue, among arq's `_` options.
DEPENDENCIES_KWARG = "_dependencies"
# The marker argument of a waiting job: {"kind": ..., "argument": ..., "batch_id": ...}.
WAITS_KWARG = "_waits"
# A waiting job, its waits hash and its parents' dependents sets live this long: a parent
# that has not ended within a week (a stuck batch) leaves nothing behind for ever.
WAIT_TTL_MS = 7 * 24 * 3600 * 1000
ERROR_MAX_CHARS = 500  # of a parent's error, carried into its cancelled dependents' reason
SHOWN_IDS = 20  # the parents a waiting job's status names (a batch's callback: the first ones)
THEN_SUFFIX = "-then"  # a follow-up's id: its parent's and this, so a retried enqueue finds it
CALLBACK_SUFFIX = "-callback"  # a batch callback's id: the batch's and this

Kind = Literal["after", "then", "callback"]
Outcome = Literal["complete", "failed", "aborted"]
OUTCOMES: tuple[Outcome, ...] = ("complete", "failed", "aborted")

_ENQUEUE_WAITING = LuaScript("jobs.engine", "enqueue_waiting")


class UnknownParent(LookupError):
    """A job named in `after` was never enqueued, or ended so long ago that nothing is left."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id} to wait for (never enqueued, or long expired)")
        self.job_id = job_id


@dataclass(frozen=True, slots=True)
class FollowUp:
    """A job to enqueue once others end: its arq function, its keyword arguments (arq's
    options among them: `_priority`, `_callback_url`, `_owner`, `_job_id`), the argument
    that receives what it waited for (None: nothing handed over), and its own follow-up."""

    function: str
    kwargs: dict[str, Any]
    argument: str | None = None
    then: FollowUp | None = None


@dataclass(frozen=True, slots=True)
class Dependencies:
    """What a job waits for, and what follows it."""

    after: tuple[str, ...] = ()
    allow_failure: bool = False
    then: FollowUp | None = None


@dataclass(frozen=True, slots=True)
class Waits:
    """A waiting job's waits hash, as read."""

    state: str  # waiting, released, cancelled
    pending: int
    total: int
    counts: dict[str, int] = field(default_factory=dict)
    cancelled_by: str | None = None
    cancel_outcome: str | None = None
    cancel_error: str | None = None
    result: bytes | None = None  # `then`: the parent's result record, if it kept one
    shown: dict[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        """Why a cancelled job did not run."""
        error = f": {self.cancel_error}" if self.cancel_error else ""
        return f"cancelled: job {self.cancelled_by} {self.cancel_outcome}{error}"


async def enqueue_with(
    redis: ArqRedis, function: str, kwargs: dict[str, Any], deps: Dependencies
) -> str | None:
    """Enqueue a job (`queue.enqueue_job`'s options in `kwargs`) that waits for `deps.after`,
    then its follow-ups; its id, or None if its `_job_id` exists. A follow-up's id is derived
    from its parent's, so enqueueing again after a crash midway adds only what is missing."""
    chosen: str | None = kwargs.get("_job_id")
    if deps.after:
        job_id = await enqueue_waiting(
            redis, function, deps.after, kwargs, kind="after", allow_failure=deps.allow_failure
        )
    else:
        job_id = await enqueue_job(redis, function, **kwargs)
    parent = job_id or chosen
    follow = deps.then
    owner = {OWNER_KWARG: kwargs[OWNER_KWARG]} if kwargs.get(OWNER_KWARG) else {}
    while follow is not None and parent is not None:  # each for its parent's owner
        kwargs = {"_job_id": parent + THEN_SUFFIX} | owner | follow.kwargs
        await enqueue_waiting(
            redis, follow.function, [parent], kwargs, kind="then", argument=follow.argument
        )
        parent, follow = kwargs["_job_id"], follow.then
    return job_id


async def enqueue_callback(
    redis: ArqRedis, batch_id: str, job_ids: Sequence[str], callback: FollowUp
) -> str:
    """The batch's callback, run once all of `job_ids` have ended, whatever their outcome;
    its id (the batch's, with CALLBACK_SUFFIX). Enqueue it after the jobs: one that has
    already ended is counted from its ended marker (or its result, for a completion)."""
    kwargs = {"_job_id": batch_id + CALLBACK_SUFFIX} | callback.kwargs
    await enqueue_waiting(
        redis,
        callback.function,
        job_ids,
        kwargs,
        kind="callback",
        allow_failure=True,
        argument=callback.argument,
        batch_id=batch_id,
    )
    return str(kwargs["_job_id"])


async def enqueue_waiting(
    redis: ArqRedis,
    function: str,
    parents: Sequence[str],
    kwargs: dict[str, Any],
    *,
    kind: Kind,
    allow_failure: bool = False,
    argument: str | None = None,
    batch_id: str | None = None,
    count: int = 0,
    outcomes: Sequence[str] = (),
) -> str | None:
    """Write a job that runs once `parents` have ended, and `count` outcomes more have been
    recorded by a batch's script, named `outcomes` (enqueue_waiting.lua); its id, or None if its
    `_job_id` exists. Raises UnknownParent."""
    kwargs = dict(kwargs) | {
        WAITS_KWARG: {"kind": kind, "argument": argument, "batch_id": batch_id}
    }
    kwargs.pop("_replicated", None)  # a waiting job is not due yet: nothing runs on it
    call = _enqueue_call(redis, function, kwargs)
    shown = {"job_ids": list(parents[:SHOWN_IDS]), "batch_id": batch_id, "kind": kind}
    keys = _waiting_job_keys(call)
    for parent in parents:
        keys += [
            job_key_prefix + parent,
            ENDED_KEY_PREFIX + parent,
            DEPENDENTS_KEY_PREFIX + parent,
            result_key_prefix + parent,
        ]
    args: list[Arg] = [
        call.job,
        WAIT_TTL_MS,
        call.job_id,
        f"enqueued|{function}",
        "1" if call.transactional else "0",
        "1" if allow_failure else "0",
        "1" if kind == "then" and argument else "0",
        timestamp_ms(),
        json.dumps(shown),
        count,
        ",".join(outcomes),
        *parents,
    ]
    reply = await _ENQUEUE_WAITING.run(redis, keys, args)
    if reply[0] == -1:
        raise UnknownParent(reply[1].decode())
    return call.job_id if reply[0] == 1 else None


async def enqueue_counted_callback(
    redis: ArqRedis, batch_id: str, total: int, callback: FollowUp, outcomes: Sequence[str]
) -> str:
    """A batch's callback that waits on a count rather than on parents (enqueue_waiting.lua's
    `count`): for a batch whose jobs are not known when it is enqueued (a newsletter's
    messages). It is released, once, by the script that records the batch's last outcome (for
    a newsletter, jobs/mail/lua/batch_record.lua), and handed `{batch_id, total, counts}` with
    a count per name in `outcomes`. Its id: the batch's, with CALLBACK_SUFFIX (written once: a
    retried request leaves it as it is)."""
    job_id = batch_id + CALLBACK_SUFFIX
    await enqueue_waiting(
        redis,
        callback.function,
        [],
        {"_job_id": job_id} | callback.kwargs,
        kind="callback",
        allow_failure=True,
        argument=callback.argument,
        batch_id=batch_id,
        count=total,
        outcomes=outcomes,
    )
    return job_id


def _waiting_job_keys(call: _Enqueue) -> list[str]:
    """enqueue_waiting.lua's first keys: the job's own, its queue's, its waits hash and the
    queue's waiting index."""
    return [
        job_key_prefix + call.job_id,
        result_key_prefix + call.job_id,
        call.queue,
        COUNTERS_KEY,
        wake_key(call.queue),
        transactional_key(call.queue),
        WAITS_KEY_PREFIX + call.job_id,
        waiting_key(call.queue),
    ]


def mark_aborted(pipe: Pipeline, queue_name: str, job_id: str) -> None:
    """Queue on `pipe`: the waiting job is aborted, so no parent's end releases it again
    (finish.lua releases only jobs still waiting), and it leaves the queue's waiting index."""
    pipe.hset(WAITS_KEY_PREFIX + job_id, "state", "aborted")
    pipe.zrem(waiting_key(queue_name), job_id)


def drop_expired_waiting(pipe: Pipeline, queue_name: str) -> None:
    """Queue on `pipe`, before a read of the queue's waiting index: drop the entries older
    than a waiting job lives (WAIT_TTL_MS), whose jobs' records have expired (a parent that
    never ended). The index itself expires WAIT_TTL_MS after its last addition."""
    cutoff = timestamp_ms() - WAIT_TTL_MS
    pipe.zremrangebyscore(waiting_key(queue_name), "-inf", f"({cutoff}")


async def read_waits(redis: Redis, job_id: str) -> Waits | None:
    """The job's waits hash, or None if it has none (never waited, or expired)."""
    raw = await redis.hgetall(WAITS_KEY_PREFIX + job_id)  # type: ignore[misc]
    return waits_of(raw) if raw else None


def waits_of(raw: dict[bytes, bytes]) -> Waits:
    def text(name: str) -> str | None:
        value = raw.get(name.encode())
        return value.decode() if value is not None else None

    named = raw.get(b"outcomes")  # a counted callback's (enqueue_counted_callback)
    outcomes = named.decode().split(",") if named else OUTCOMES
    counts: dict[str, int] = {o: int(raw.get(f"n:{o}".encode(), 0)) for o in outcomes}
    return Waits(
        state=text("state") or "waiting",
        pending=int(raw.get(b"pending", 0)),
        total=int(raw.get(b"total", 0)),
        counts=counts,
        cancelled_by=text("cancelled_by"),
        cancel_outcome=text("cancel_outcome"),
        cancel_error=text("cancel_error"),
        result=raw.get(b"result"),
        shown=json.loads(raw.get(b"shown") or b"{}"),
    )


async def take_hand_off(
    redis: Redis, job_id: str, marker: dict[str, Any], kwargs: dict[str, Any], deserializer: Any
) -> str | None:
    """For the runner, before a waiting job runs: why it must not run (a parent failed for
    good: it ends as failed with this reason), else None, having put what it waited for in
    `kwargs` (the parent's result for `then`; the batch's counts for a callback)."""
    waits = await read_waits(redis, job_id)
    if waits is None:
        return "cancelled: what it waited for is no longer known (its wait record expired)"
    if waits.state == "cancelled":
        return waits.reason
    argument = marker.get("argument")
    if not argument:
        return None
    if marker.get("kind") == "then":
        kwargs[argument] = _result_of(waits.result, deserializer)
    elif marker.get("kind") == "callback":
        summary = {"batch_id": marker.get("batch_id"), "total": waits.total, "counts": waits.counts}
        given = kwargs.get(argument)  # a webhook's payload: the counts join its fields
        kwargs[argument] = given | summary if isinstance(given, dict) else summary
    return None


def _result_of(raw: bytes | None, deserializer: Any) -> Any:
    """The value a parent's result record holds (None if the parent kept no result)."""
    if raw is None:
        return None
    return deserialize_result(raw, deserializer=deserializer).result


def finish_fields(outcome: str, error: str | None) -> tuple[str, str]:
    """The outcome and error finish.lua records for a job that ended for good."""
    return outcome, (error or "")[:ERROR_MAX_CHARS].replace("\n", " ")


class Cancelled(JobExecutionFailed):
    """How a waiting job ends when a parent did not complete: failed, without running. One
    argument, the message, so that it unpickles where the API reads the job's result."""
