"""Classified retries: transient errors back off and retry, the rest go to the dead-letter store.

Every job function is wrapped by `classified(family)`. The wrapper decides from the error's class
(see asyncjobs.errors) whether another try can help, and when it cannot, records the job before arq
marks it failed, so no failed job vanishes when its arq result expires.
"""

from __future__ import annotations

import functools
import logging
import random
import reprlib
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

from arq.worker import Retry
from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from asyncjobs import tracing
from asyncjobs.deadlines import deadline
from asyncjobs.errors import PermanentJobError, Postpone, TransientJobError
from asyncjobs.keys import RETRYING_KEY_PREFIX
from asyncjobs.registry import (
    Family,
    JobFunction,
    JobRegistrationError,
    JobType,
    Priority,
    RetryPolicy,
    family_policy,
    policy_of,
    register,
)
from asyncjobs.settings import Settings
from jobs.context import WorkerContext
from jobs.deadletter import DeadLetter, add_dead_letter
from jobs.values import now_utc

log = logging.getLogger(__name__)

# What the running job said about its result, for its one completion line (see `report`).
_REPORT: ContextVar[dict[str, Any] | None] = ContextVar("job_report", default=None)

DeadLetterHook = Callable[[WorkerContext, dict[str, Any]], Awaitable[None]]
# The engine's own deadline is this much longer than the job's timeout, so the wrapper's fires
# first and the timeout is classified (transient) and recorded like any other failure.
ENGINE_TIMEOUT_GRACE_S = 5.0


def retry_policy(settings: Settings, family: Family) -> RetryPolicy:
    """A built-in family's policy (kept for the built-ins' helpers and tests)."""
    return family_policy(settings, family)


def max_tries(settings: Settings, family: Family) -> int:
    return family_policy(settings, family).max_tries


def job_timeout(settings: Settings, timeout: float | None) -> float:
    """A job's own timeout: its declaration's, else JOB_TIMEOUT."""
    return settings.job_timeout if timeout is None else timeout


def backoff_delay(policy: RetryPolicy, job_try: int, retry_after: float | None = None) -> float:
    """Exponential backoff with "equal jitter"; a server's Retry-After is a floor (within cap)."""
    ceiling = min(policy.max_delay, policy.base_delay * 2 ** (job_try - 1))
    delay = random.uniform(ceiling / 2, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, policy.max_delay))
    return delay


async def record_retry(
    redis: Redis, job_id: str, error: Exception, job_try: int, delay: float
) -> None:
    """What GET /jobs/{id} shows while the job waits: the last error and the next try."""
    key = RETRYING_KEY_PREFIX + job_id
    next_try_ms = int((time.time() + delay) * 1000)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping={"error": str(error), "try": job_try, "next_try_ms": next_try_ms})
        pipe.expire(key, int(delay) + 24 * 3600)
        await pipe.execute()


def report(summary: str, **fields: Any) -> None:
    """Say what this job did, in its completion line ("job send_email <id> completed in 3 ms:
    email <id> sent to 1 recipient(s)", with `fields` as extra JSON fields): one line per job
    instead of two, which at hundreds of jobs a second is a visible share of the worker's CPU.
    Outside a classified job (a test calling a job's helpers) it is a line of its own."""
    note = _REPORT.get()
    if note is None:
        log.info("%s", summary, extra=fields)
        return
    note["summary"] = summary
    note.update(fields)


@dataclass(frozen=True)
class Classification:
    """What the wrapper needs of a job's declaration: its retry policy (a fixed one or a
    built-in family's), its timeout, and which of its own exceptions are transient or
    permanent (asyncjobs' TransientJobError and PermanentJobError always are)."""

    retry: RetryPolicy | Family
    timeout: float | None = None
    transient: tuple[type[BaseException], ...] = ()
    permanent: tuple[type[BaseException], ...] = ()

    def policy(self, settings: Settings) -> RetryPolicy:
        return policy_of(self.retry, settings)


def classified(
    retry: RetryPolicy | Family | Classification, on_dead_letter: DeadLetterHook | None = None
) -> Callable[[JobFunction], JobFunction]:
    """Wrap a job: retry transient errors, dead-letter the rest (then call `on_dead_letter`)."""
    rules = retry if isinstance(retry, Classification) else Classification(retry)

    def decorate(job: JobFunction) -> JobFunction:
        attempt = _attempt(job, rules, on_dead_letter)

        @functools.wraps(job)
        async def run(arq_ctx: dict[str, Any] | WorkerContext, *args: Any, **kwargs: Any) -> Any:
            """Run one try and tell the monitor and the log how it ended."""
            ctx = WorkerContext.of(arq_ctx)  # the job's typed view of arq's ctx
            monitor = ctx.monitor
            name, job_id = job.__name__, ctx.job_id
            if monitor:
                monitor.started(job_id, name, due_ms(ctx))
            started = time.perf_counter()
            outcome = "cancelled"  # aborted, or the worker is shutting down
            note: dict[str, Any] = {}
            _REPORT.set(note)  # each job runs in a task of its own, so in a context of its own
            try:
                result = await attempt(ctx, *args, **kwargs)
                outcome = "completed"
                if monitor and job_id.startswith("cron:"):
                    monitor.cron_ran(job_id.split(":")[1], result)
                return result
            except Retry:
                outcome = "retried"
                raise
            except Postpone:
                outcome = "postponed"
                raise
            except Exception:
                outcome = "failed"
                raise
            finally:
                seconds = time.perf_counter() - started
                tracing.note_outcome(outcome)  # on the try's span (asyncjobs.tracing)
                if monitor:
                    monitor.finished(job_id, name, outcome, seconds)
                summary = note.pop("summary", None)
                log.info(
                    "job %s %s %s in %.0f ms%s", name, job_id, outcome, seconds * 1000,
                    f": {summary}" if summary else "",
                    extra={"job_id": job_id, "function": name, "try": ctx.job_try,
                           "duration_ms": round(seconds * 1000, 1), "outcome": outcome, **note},
                )  # fmt: skip

        return run

    return decorate


def due_ms(ctx: WorkerContext) -> float | None:
    """When this run became due: its queue score (enqueued, or a retry's or postponement's
    time), so pickup latency is not inflated by waits the job asked for."""
    if score := ctx.score:
        return score
    enqueue_time = ctx.enqueue_time
    return enqueue_time.timestamp() * 1000 if enqueue_time else None


def _attempt(
    job: JobFunction, rules: Classification, on_dead_letter: DeadLetterHook | None
) -> JobFunction:
    """One try: the job's result, `Retry` for a transient error with tries left, or the error
    (after dead-lettering the job) when there is nothing more to try."""

    async def attempt(ctx: WorkerContext, *args: Any, **kwargs: Any) -> Any:
        settings = ctx.settings
        job_try = ctx.job_try
        policy = rules.policy(settings)
        limit = policy.max_tries
        timeout = job_timeout(settings, rules.timeout)
        try:
            if job_try > limit:  # re-runs after worker crashes count as tries too
                raise PermanentJobError(f"gave up: started {job_try - 1} times, never finished")
            if args:  # a plain arq producer's positional call: kept, with why, not a crash
                raise PermanentJobError(
                    f"{job.__name__} takes keyword arguments only; got {len(args)} positional: "
                    f"{reprlib.repr(args)}"
                )
            async with deadline(timeout):
                try:
                    result = await job(ctx, **kwargs)
                except rules.permanent as exc:
                    raise PermanentJobError(f"{type(exc).__name__}: {exc}") from exc
                except rules.transient as exc:
                    raise TransientJobError(f"{type(exc).__name__}: {exc}") from exc
            if job_try > 1:  # it waited for a retry: nothing to explain any more
                await ctx.redis.delete(RETRYING_KEY_PREFIX + ctx.job_id)
            return result
        except Postpone:
            raise  # not a failure: the job runs again later, and this run is not a try
        except TimeoutError as exc:
            error: Exception = TransientJobError(f"job timed out after {timeout:g}s")
            error.__cause__ = exc
        except (PermanentJobError, TransientJobError) as exc:
            error = exc
        except RedisError as exc:  # Redis restarting: worth another try once it is back
            error = TransientJobError(f"Redis unavailable: {exc}")
        except ValidationError as exc:
            error = PermanentJobError(f"invalid job arguments: {exc}")
        except Exception as exc:  # a bug: retrying will not fix it, keep it for a human
            log.exception("job %s (%s) raised an unexpected error", ctx.job_id, job.__name__)
            error = PermanentJobError(f"unexpected error: {type(exc).__name__}: {exc}")

        if (
            isinstance(error, TransientJobError)
            and job_try < limit
            and not policy.expired(ctx.enqueue_time, now_utc())
        ):
            if error.backoff or error.retry_after is None:
                delay = backoff_delay(policy, job_try, error.retry_after)
            else:  # told when: a little past it, so a crowd of deferred jobs spreads out
                delay = error.retry_after * random.uniform(1.0, 1.1)
            log.log(
                logging.WARNING if error.warn_each_try else logging.INFO,
                "job %s try %d failed, retrying in %.2fs: %s", ctx.job_id, job_try, delay, error,
            )  # fmt: skip
            await record_retry(ctx.redis, ctx.job_id, error, job_try, delay)
            tracing.record_error(error)
            raise Retry(defer=delay) from error
        reason: Literal["permanent", "exhausted"] = (
            "exhausted" if isinstance(error, TransientJobError) else "permanent"
        )
        await add_dead_letter(
            ctx.redis,
            DeadLetter(
                id=ctx.job_id,
                function=job.__name__,
                arguments=kwargs,
                error=str(error),
                reason=reason,
                tries=job_try,
                enqueue_time=ctx.enqueue_time,
                failed_at=now_utc(),
            ),
            settings,
        )
        if on_dead_letter is not None:
            await on_dead_letter(ctx, kwargs)
        # One line with the reason: a 404 or a refused address is expected, not a crash (an
        # unexpected error already logged its traceback above).
        log.warning(
            "job %s dead-lettered (%s after %d tries): %s", ctx.job_id, reason, job_try, error
        )
        tracing.record_error(error)
        raise error

    return attempt


def builtin(
    name: str,
    retry: Family,
    *,
    priority: Priority = "bulk",
    endpoint: str | None = None,
    schedulable: bool = False,
    cost: int = 1,
    on_dead_letter: DeadLetterHook | None = None,
    shown: tuple[str, ...] = (),
    arguments: type[BaseModel] | None = None,
) -> Callable[[JobFunction], JobFunction]:
    """Declare a built-in job in the registry (asyncjobs.registry), wrapped by `classified`:
    its name, its family's retry policy, its default priority, its endpoint (`POST
    /jobs/<endpoint>`, whose body app/routes checks; none for jobs only the worker enqueues),
    what a call costs and whether `POST /schedules` may run it (by its endpoint's name). With
    `arguments` (a model of its keyword arguments), every enqueue path checks a call as it
    does a user's job's, and a schedule runs it with no code of its own (the http job)."""

    if schedulable and endpoint is None:  # a schedule names a built-in by its endpoint
        raise JobRegistrationError(f"built-in {name!r}: schedulable needs an endpoint")

    def declare(job: JobFunction) -> JobFunction:
        wrapped = classified(retry, on_dead_letter)(job)
        register(
            JobType(
                name=name,
                function=wrapped,
                retry=retry,
                priority=priority,
                cost=cost,
                schedulable=schedulable,
                builtin=True,
                endpoint=endpoint,
                summary=(job.__doc__ or "").strip().split("\n")[0],
                shown=shown,
                arguments=arguments,
            )
        )
        return wrapped

    return declare
