"""How this project's worker (jobs.engine.worker.EngineWorker) takes, runs and finishes jobs.

arq 0.28's worker claims each job with two transactions and finishes it with a third, about ten
round trips to Redis per job, and logs two lines per job; at a few hundred jobs per second that
Redis client work is most of the worker's CPU. Here, per poll: one script claims every job there
is a free slot for (jobs/engine/queue.py), jobs that end while a finish is being written are written
together by the next one, and the leases of all running jobs are renewed once a second. The
job's life is arq's: the same context, timeouts, `Retry`, aborts, results, tries and hooks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import socket
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from arq.cron import CronJob
from arq.worker import Function, Retry

from asyncjobs.arqcompat import (
    WORKER_LOGGER,
    JobExecutionFailed,
    RetryJob,
    SeamWorker,
    SerializationError,
    deserialize_job_raw,
    keep_cronjob_progress,
    ms_to_datetime,
    result_record,
    retry_key_prefix,
    timestamp_ms,
    to_ms,
)
from asyncjobs.context import SETTINGS
from asyncjobs.deadlines import deadline
from asyncjobs.errors import JobError, Postpone
from asyncjobs.speedups import dumps
from asyncjobs.tracing import TRACE_KWARG, process_span
from jobs.context import MONITOR, OWNER
from jobs.deadletter import DeadLetter, add_dead_letter
from jobs.engine.dependencies import WAITS_KWARG, Cancelled, finish_fields, take_hand_off
from jobs.engine.queue import (
    CALLBACK_KWARG,
    OWNER_KWARG,
    RETRY_KEY_TTL_S,
    Claimed,
    Claims,
    Finish,
    claim,
    finish,
    renew_leases,
)
from jobs.values import now_utc
from jobs.webhooks import FinalStatus, enqueue_webhook

log = logging.getLogger(WORKER_LOGGER)  # where arq's own job lines went: same logger and config

RENEW_EVERY_S = 1.0
TRY_ERROR_MAX_CHARS = 2000  # per entry of a job's tries list: 50 tries stay small
T = TypeVar("T")


class WakeUp:
    """Tells the poll loop to poll now; one per event loop (tests run many loops in one
    process). `running` counts the jobs of this loop's workers: a busy worker's wake-ups are
    merged (see EngineWorker._wait_for_poll), an idle one's are not."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.running = 0


_wake_ups: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WakeUp] = (
    weakref.WeakKeyDictionary()
)


def wake_state() -> WakeUp:
    loop = asyncio.get_running_loop()
    if loop not in _wake_ups:
        _wake_ups[loop] = WakeUp()
    return _wake_ups[loop]


def wake_up() -> None:
    """Poll now: a job was enqueued, or a slot of this worker became free."""
    wake_state().event.set()


@dataclass
class _Job:
    """What run_claimed knows about the job it runs."""

    claimed: Claimed
    function_name: str = "<unknown>"
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] | None = None
    enqueue_time_ms: int = 0
    job_try: int = 0
    callback_url: str | None = None  # a completion webhook to enqueue when it ends for good
    owner: str | None = None  # the API key it was enqueued for
    trace: dict[str, str] | None = None  # the enqueue's trace context (asyncjobs.tracing)
    waits: dict[str, Any] | None = None  # it waited for other jobs (jobs/engine/dependencies)
    ended: tuple[FinalStatus, Any] | None = None  # how it ended for good, once it has
    started_ms: int = 0  # when this try began (0: it never ran)
    outcome: str = "retrying"  # this try's, when it did not end the job
    error: str | None = None  # why this try failed, for the job's tries list


class Engine:
    """One worker's claims, batched finishes and lease renewals."""

    def __init__(self, worker: SeamWorker) -> None:
        self.worker = worker
        self.lease_ms = int(worker.in_progress_timeout_s * 1000)
        # ends waiting to be written; a future for each that a job task waits on (None: a
        # claim handed back, which nobody waits for)
        self._finishing: list[tuple[Finish, asyncio.Future[None] | None]] = []
        # claimed jobs whose end is not yet on its way to Redis, by id
        self._unwritten: dict[str, Claimed] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._renewed_at = time.monotonic()
        # the earliest time a job in the queue is due (ms), so a deferred job starts on time
        self.next_due_ms: int | None = None
        self._worker_name: str | None = None

    @property
    def worker_name(self) -> str:
        """As the workers list names this worker (its monitor's id, set up at start-up)."""
        if self._worker_name is None:
            monitor = self.worker.ctx.get(MONITOR)
            self._worker_name = getattr(monitor, "worker_id", None) or (
                f"{socket.gethostname()}-{os.getpid()}"
            )
        return self._worker_name

    def with_try(self, job: _Job, item: Finish) -> Finish:
        """`item` carrying this try's entry for the job's tries list, so the list is written
        by the finish script the try needs anyway: no round trip of its own."""
        completed = job.ended is not None and job.ended[0] == "complete"
        if not item.counts_as_try or (item.done and job.job_try == 1 and completed):
            # a postponed run is not a try; a first try that ended well is told by the result
            # itself (the job page shows it from there): most jobs write no list at all
            return item
        ended_ms = timestamp_ms()
        record = {
            "try": job.job_try,
            "started_at": job.started_ms or ended_ms,
            "ended_at": ended_ms,
            "worker": self.worker_name,
            "outcome": job.ended[0] if job.ended else job.outcome,
            "error": job.error[:TRY_ERROR_MAX_CHARS] if job.error else None,
        }
        return dataclasses.replace(item, try_record=dumps(record).encode())

    # -- one poll --
    async def poll(self) -> None:
        w = self.worker
        aborts, claimed, self.next_due_ms = await self._claim(self._free_slots())
        for job in claimed:
            self._start(job)
        if w.allow_abort_jobs and aborts:
            self._cancel(aborts)
        if time.monotonic() - self._renewed_at >= RENEW_EVERY_S:
            self._renewed_at = time.monotonic()
            await renew_leases(w.pool, w.queue_name, list(w.tasks), self.lease_ms)
        await w.heart_beat()

    def _free_slots(self) -> int:
        w = self.worker
        if not w.allow_pick_jobs:
            return 0
        free = min(w.max_jobs - w.job_counter, w.queue_read_limit)
        if w.burst and w.max_burst_jobs >= 0:
            free = min(free, w.max_burst_jobs - w.jobs_started)
        return max(free, 0)

    async def _claim(self, limit: int) -> Claims:
        """Claim, and if the worker is stopped meanwhile, put what was claimed back at once
        rather than leaving it to wait for its lease to end."""
        w = self.worker
        claiming = asyncio.ensure_future(claim(w.pool, w.queue_name, limit, self.lease_ms))
        try:
            return await asyncio.shield(claiming)
        except asyncio.CancelledError:
            (_, claimed, _), _ = await outlast_cancellation(claiming)
            back = [Finish(job.job_id, done=False, score=job.score) for job in claimed]
            await outlast_cancellation(asyncio.ensure_future(finish(w.pool, w.queue_name, back)))
            raise

    def _start(self, job: Claimed) -> None:
        w = self.worker
        if job.job_id in w.tasks:  # our own lease lapsed (a stalled loop): one run is enough
            log.warning(
                "job %s claimed again while it runs here; not starting it twice", job.job_id
            )
            return
        w.job_counter += 1
        wake_state().running += 1
        self._unwritten[job.job_id] = job
        task = asyncio.get_running_loop().create_task(run_claimed(w, self, job))
        w.tasks[job.job_id] = task
        task.add_done_callback(functools.partial(self._done, job.job_id))

    def _done(self, job_id: str, task: asyncio.Task[None]) -> None:
        w = self.worker
        w.job_counter -= 1
        wake_state().running -= 1
        if w.tasks.get(job_id) is task:
            del w.tasks[job_id]
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("job %s: the engine failed to run it", job_id, exc_info=exc)
        if (job := self._unwritten.pop(job_id, None)) is not None:
            # Ended without writing its end: cancelled before it ran (the worker is stopping)
            # or the engine failed. Hand it back to run again now, not when its lease ends.
            self._write(Finish(job_id, done=False, score=job.score), None)
        wake_up()  # a slot is free: look for the next job now, not at the next poll

    def _cancel(self, aborts: list[str]) -> None:
        w = self.worker
        for job_id in aborts:
            task = w.job_tasks.get(job_id)
            if task is not None and job_id not in w.aborting_tasks:
                w.aborting_tasks.add(job_id)
                task.cancel()

    # -- batched finishes --
    async def finish(self, item: Finish) -> None:
        """Write how a job ended; returns once it is in Redis. Jobs that end while a write is
        under way go together in the next one.

        A cancellation that arrives meanwhile (the worker is stopping: arq cancels every task
        it has) is absorbed: the job has already ended, so there is nothing left to stop, and
        its task ends normally once the write is done instead of leaving it half made."""
        self._unwritten.pop(item.job_id, None)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._write(item, future)
        _, cancels = await outlast_cancellation(future)
        task = asyncio.current_task()
        for _ in range(cancels):
            if task is not None:
                task.uncancel()

    def _write(self, item: Finish, future: asyncio.Future[None] | None) -> None:
        self._finishing.append((item, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="finish-jobs")

    async def drain(self) -> None:
        """Wait until every end handed to the engine is written (the worker is closing)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.gather(self._flusher, return_exceptions=True)

    async def _flush(self) -> None:
        while self._finishing:
            batch, self._finishing = self._finishing, []
            futures = [future for _, future in batch if future is not None]
            try:
                await finish(self.worker.pool, self.worker.queue_name, [i for i, _ in batch])
            except asyncio.CancelledError:
                for future in futures:
                    future.cancel()
                raise
            except Exception as exc:  # the jobs run again when their leases end
                if len(futures) < len(batch):
                    log.warning(
                        "handing claimed jobs back failed (%s); they run again "
                        "when their leases end",
                        exc,
                    )
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for future in futures:
                    if not future.done():
                        future.set_result(None)


async def outlast_cancellation(future: asyncio.Future[T]) -> tuple[T, int]:
    """Wait for `future` even if the caller is cancelled meanwhile, any number of times; its
    result and how many cancellations arrived. Only a cancellation of `future` itself (the
    loop is closing) ends the wait early.

    For writes that record what already happened (a job's end, claims handed back): dropped
    halfway, they would leave jobs hidden until their lease ends or run a finished job again.
    """
    cancels = 0
    while True:
        try:
            return await asyncio.shield(future), cancels
        except asyncio.CancelledError:
            if future.cancelled():
                raise
            cancels += 1


async def run_claimed(worker: SeamWorker, engine: Engine, claimed: Claimed) -> None:
    """arq's run_job for a job already claimed: check it, run it, write how it ended."""
    job = _Job(claimed, job_try=claimed.job_try)
    function = _check(worker, job)
    if job.waits is not None and not isinstance(function, BaseException):
        # what it waited for goes in its arguments; a parent that failed cancels it
        kwargs = job.kwargs if job.kwargs is not None else {}
        why = await take_hand_off(
            worker.pool, claimed.job_id, job.waits, kwargs, worker.job_deserializer
        )
        function = function if why is None else Cancelled(why)
    if isinstance(function, BaseException):  # finished without running
        if isinstance(function, UnknownFunction):
            await _dead_letter_unknown(worker, job, function)
        job.error = str(function) or "aborted before it started"
        item = engine.with_try(job, _failed(worker, job, function))
        await _report_end(worker, job)
        await engine.finish(item)
        return
    if job.job_try != claimed.job_try:  # the enqueuer asked for a later try number
        key = retry_key_prefix + claimed.job_id
        await worker.pool.setex(key, RETRY_KEY_TTL_S, str(job.job_try))
    ctx = {
        **worker.ctx,
        "job_id": claimed.job_id,
        "job_try": job.job_try,
        "enqueue_time": ms_to_datetime(job.enqueue_time_ms),
        "score": claimed.score,
        OWNER: job.owner,
    }
    with process_span(job.function_name, claimed.job_id, job.job_try, job.trace, worker.queue_name):
        if worker.on_job_start:
            await worker.on_job_start(ctx)
        item = engine.with_try(job, await _execute(worker, job, function, ctx))
        if worker.on_job_end:
            await worker.on_job_end(ctx)
        await _report_end(worker, job)
        await engine.finish(item)
        if worker.after_job_end:
            await worker.after_job_end(ctx)


def _check(worker: SeamWorker, job: _Job) -> Function | CronJob | BaseException:
    """The function to run, or why the job is finished without running (arq's checks)."""
    claimed = job.claimed
    if claimed.raw is None:
        log.warning("job %s expired", claimed.job_id)
        return JobExecutionFailed("job expired")
    try:
        job.function_name, job.args, job.kwargs, enqueue_try, job.enqueue_time_ms = (
            deserialize_job_raw(claimed.raw, deserializer=worker.job_deserializer)
        )
    except SerializationError as exc:
        log.exception("deserializing job %s failed", claimed.job_id)
        return exc
    if job.kwargs:
        job.callback_url = job.kwargs.pop(CALLBACK_KWARG, None)
        job.owner = job.kwargs.pop(OWNER_KWARG, None)
        job.trace = job.kwargs.pop(TRACE_KWARG, None)  # popped whether or not tracing is on
        job.waits = job.kwargs.pop(WAITS_KWARG, None)
    if claimed.aborted and worker.allow_abort_jobs:
        log.info("%s:%s aborted before start", claimed.job_id, job.function_name)
        return asyncio.CancelledError()
    function = worker.functions.get(job.function_name)
    if function is None:
        return UnknownFunction.of(job.function_name, worker.functions)
    if enqueue_try and enqueue_try > job.job_try:
        job.job_try = enqueue_try
    # No try limit here: each job's retry policy is enforced by its wrapper (jobs.retry),
    # which sees every try, crash re-runs included, and dead-letters the job itself.
    return function


class UnknownFunction(JobExecutionFailed):
    """The job names a function this worker does not have (a plain arq producer, a typo, a
    job type removed or not yet deployed). One argument, the message, so that it unpickles
    where the API reads the job's result."""

    @classmethod
    def of(cls, name: str, known: Iterable[str]) -> UnknownFunction:
        types = ", ".join(sorted(n for n in known if not n.startswith("cron:")))
        return cls(f"no job type {name!r} on this worker (JOB_MODULES); it has: {types}")


async def _dead_letter_unknown(worker: SeamWorker, job: _Job, error: UnknownFunction) -> None:
    """Keep a job no worker can run in the dead-letter store, with the reason, so it can be
    retried once a worker has its function, instead of failing into arq's results only."""
    log.warning("job %s dead-lettered: %s", job.claimed.job_id, error)
    entry = DeadLetter(
        id=job.claimed.job_id,
        function=job.function_name,
        arguments=job.kwargs or {},
        error=str(error),
        reason="permanent",
        tries=job.job_try,
        enqueue_time=ms_to_datetime(job.enqueue_time_ms) if job.enqueue_time_ms else None,
        failed_at=now_utc(),
    )
    await add_dead_letter(worker.pool, entry, worker.ctx.get(SETTINGS))


def _failed(worker: SeamWorker, job: _Job, error: BaseException) -> Finish:
    worker.jobs_failed += 1
    now = timestamp_ms()
    return _done_item(worker, job, None, False, error, now, now)


def _done_item(
    worker: SeamWorker,
    job: _Job,
    function: Function | CronJob | None,
    success: bool,
    result: Any,
    start_ms: int,
    finished_ms: int,
) -> Finish:
    """The finish that takes the job out of the queue, with its result if results are kept."""
    aborted = not success and isinstance(result, asyncio.CancelledError)
    job.ended = ("complete" if success else "aborted" if aborted else "failed", result)
    keep_forever = worker.keep_result_forever
    keep_s: float | None = worker.keep_result_s
    if function is not None:
        if function.keep_result_forever is not None:
            keep_forever = function.keep_result_forever
        if function.keep_result_s is not None:
            keep_s = function.keep_result_s
    data = None
    if keep_forever or (keep_s or 0) > 0:
        data = result_record(
            function=job.function_name,
            args=job.args,
            kwargs=job.kwargs or {},
            job_try=job.job_try,
            enqueue_time_ms=job.enqueue_time_ms,
            success=success,
            result=result,
            start_ms=start_ms,
            finished_ms=finished_ms,
            ref=_ref(job, function),
            queue_name=worker.queue_name,
            job_id=job.claimed.job_id,
            serializer=worker.job_serializer,
        )
    # its end releases the jobs waiting on it, in the same script (finish.lua)
    outcome, error = finish_fields(job.ended[0] if job.ended else "", job.error)
    return Finish(
        job.claimed.job_id,
        done=True,
        result=data,
        result_ttl_ms=0 if keep_forever else to_ms(keep_s) or 0,
        keep_in_progress_ms=_keep_in_progress_ms(function),
        outcome=outcome,
        error=error,
    )


async def _report_end(worker: SeamWorker, job: _Job) -> None:
    """Enqueue the completion webhook of a job that ended for good, before its end is written:
    a crash in between runs the job again, and the webhook's fixed job id reports it once."""
    if job.callback_url and job.ended:
        status, outcome = job.ended
        try:
            await enqueue_webhook(
                worker.pool, job.callback_url, job.claimed.job_id, status, outcome
            )
        except Exception:  # the job itself ended: its end is still written
            log.exception("enqueueing the webhook of job %s failed", job.claimed.job_id)


def _ref(job: _Job, function: Function | CronJob | None) -> str:
    if isinstance(function, CronJob):
        return job.function_name
    return f"{job.claimed.job_id}:{job.function_name}"


def _keep_in_progress_ms(function: Function | CronJob | None) -> int:
    """arq keeps a cron job's in-progress key a while after it ends, so it is not run twice."""
    return int(keep_cronjob_progress * 1000) if isinstance(function, CronJob) else 0


async def _execute(
    worker: SeamWorker, job: _Job, function: Function | CronJob, ctx: dict[str, Any]
) -> Finish:
    """Run the job's coroutine within its timeout; how it ended, as arq would record it.

    It runs in this task, the job's engine task (no second task per job: creating and
    awaiting one was a visible share of a short job's CPU). An abort cancels this task while
    the job runs (`job_tasks` names it only then), and the cancellation ends here: what
    follows, writing the job's end, is not cancelled by it."""
    job_id = job.claimed.job_id
    timeout_s = worker.job_timeout_s if function.timeout_s is None else function.timeout_s
    start_ms = job.started_ms = timestamp_ms()
    if log.isEnabledFor(logging.DEBUG):  # _ref formats a string: not for lines nobody sees
        log.debug("→ %s try=%d", _ref(job, function), job.job_try)
    task = asyncio.current_task()
    assert task is not None
    worker.job_tasks[job_id] = task
    try:
        async with deadline(timeout_s):
            result = await function.coroutine(ctx, *job.args, **(job.kwargs or {}))
    except Retry as exc:
        job.error = str(exc.__cause__ or "retry requested")  # jobs.retry raises Retry from it
        if not worker.retry_jobs:
            return _crashed(worker, job, function, exc, start_ms)
        worker.jobs_retried += 1
        delay_ms = exc.defer_score or 0
        log.debug("↻ %s retrying in %.2fs", _ref(job, function), delay_ms / 1000)
        return _again(job, function, timestamp_ms() + delay_ms if delay_ms else None)
    except Postpone as exc:
        log.debug("⏸ %s postponed %.2fs: %s", _ref(job, function), exc.delay, exc)
        later = _again(job, function, timestamp_ms() + int(exc.delay * 1000))
        return dataclasses.replace(later, counts_as_try=False)
    except asyncio.CancelledError as exc:
        if job_id in worker.aborting_tasks:
            worker.aborting_tasks.discard(job_id)
            task.uncancel()  # the abort was for the job, which is over: the task goes on
            worker.jobs_failed += 1
            job.error = "aborted"
            log.info("⊘ %s aborted", _ref(job, function))
            return _done_item(worker, job, function, False, exc, start_ms, timestamp_ms())
        if not worker.retry_jobs:
            return _crashed(worker, job, function, exc, start_ms)
        worker.jobs_retried += 1  # the worker is stopping: another one runs it again
        job.outcome, job.error = "interrupted", "the worker stopped: the job runs again"
        log.info("↻ %s cancelled, will be run again", _ref(job, function))
        return _again(job, function)
    except RetryJob as exc:
        if not worker.retry_jobs:
            return _crashed(worker, job, function, exc, start_ms)
        worker.jobs_retried += 1
        job.error = str(exc)
        return _again(job, function)
    except Exception as exc:
        return _crashed(worker, job, function, exc, start_ms)
    finally:
        worker.job_tasks.pop(job_id, None)
    worker.jobs_complete += 1
    if log.isEnabledFor(logging.DEBUG):  # _ref formats a string: not for lines nobody sees
        log.debug("← %s", _ref(job, function))
    return _done_item(worker, job, function, True, result, start_ms, timestamp_ms())


def _again(job: _Job, function: Function | CronJob, score: int | None = None) -> Finish:
    """Back in the queue: at `score` (a retry's delay), else where it was (it runs next)."""
    return Finish(
        job.claimed.job_id,
        done=False,
        score=job.claimed.score if score is None else score,
        keep_in_progress_ms=_keep_in_progress_ms(function),
    )


def _crashed(
    worker: SeamWorker,
    job: _Job,
    function: Function | CronJob,
    exc: BaseException,
    start_ms: int,
) -> Finish:
    worker.jobs_failed += 1
    job.error = job.error or str(exc) or type(exc).__name__
    if isinstance(exc, JobError):  # expected (a 404, a refused address): the job's own wrapper
        log.debug("! %s failed: %s", _ref(job, function), exc)  # logged it, with its reason
    else:  # nobody expected this one: the traceback is what an operator needs
        log.error("! %s failed, %s: %s", _ref(job, function), type(exc).__name__, exc, exc_info=exc)
    return _done_item(worker, job, function, False, exc, start_ms, timestamp_ms())
