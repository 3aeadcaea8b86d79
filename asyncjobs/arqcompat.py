"""The one seam between this project and arq: everything it uses beyond arq's documented API.

arq documents `Worker`, `func`, `cron`, `create_pool`, `ArqRedis`, `Job` and its (de)serialisers;
everything else this project relies on (its Redis key layout, its time helpers, the shape of its
records, the private parts of its Worker that the engine replaces, and the one way into its CLI)
is named here, and tests/engine/test_arqcompat.py checks each assumption against the installed
arq, so that an upgrade fails there first with a message saying which assumption broke.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

import arq.cli
import arq.worker

# arq's key layout: the engine's Lua scripts, the status reads and the dashboard use arq's keys
# so that arq's own `enqueue_job` and `Job` keep working against the same queue.
from arq.constants import (
    abort_jobs_ss,
    default_queue_name,
    expires_extra_ms,
    health_check_key_suffix,
    in_progress_key_prefix,
    job_key_prefix,
    keep_cronjob_progress,
    result_key_prefix,
    retry_key_prefix,
)

# arq's job and result records: the engine reads and writes them as arq's worker does.
from arq.jobs import SerializationError, deserialize_job_raw, serialize_result

# arq's clock helpers: job records hold milliseconds since the epoch, read as arq reads them.
from arq.utils import ms_to_datetime, timestamp_ms, to_ms

# arq's Worker (documented), and the exceptions its run_job ends jobs with (not documented): the
# engine raises and catches them as run_job does.
from arq.worker import JobExecutionFailed, RetryJob, Worker

if TYPE_CHECKING:
    from arq.typing import WorkerSettingsType

__all__ = [
    "WORKER_ATTRIBUTES",
    "WORKER_CLASS",
    "WORKER_LOGGER",
    "JobExecutionFailed",
    "RetryJob",
    "SeamWorker",
    "SerializationError",
    "abort_jobs_ss",
    "arq_cli_is_importing",
    "default_queue_name",
    "deserialize_job_raw",
    "expires_extra_ms",
    "health_check_key_suffix",
    "in_progress_key_prefix",
    "job_key_prefix",
    "keep_cronjob_progress",
    "ms_to_datetime",
    "result_key_prefix",
    "result_record",
    "retry_key_prefix",
    "take_over_arq_cli",
    "timestamp_ms",
    "to_ms",
]

# The logger arq's Worker writes its job lines to: the engine writes its own there, so one
# logging config covers both.
WORKER_LOGGER = "arq.worker"
# The attributes of arq's Worker that the engine (jobs/engine/runner.py and worker.py) reads or
# writes: public names, set in `Worker.__init__`, but not documented. Read directly, not through
# properties: the runner reads them per job.
WORKER_ATTRIBUTES = frozenset(
    {
        "aborting_tasks",
        "after_job_end",
        "allow_abort_jobs",
        "allow_pick_jobs",
        "burst",
        "ctx",
        "functions",
        "heart_beat",
        "in_progress_timeout_s",
        "job_counter",
        "job_deserializer",
        "job_serializer",
        "job_tasks",
        "job_timeout_s",
        "jobs_complete",
        "jobs_failed",
        "jobs_retried",
        "keep_result_forever",
        "keep_result_s",
        "max_burst_jobs",
        "max_jobs",
        "on_job_end",
        "on_job_start",
        "poll_delay_s",
        "pool",
        "queue_name",
        "queue_read_limit",
        "retry_jobs",
        "tasks",
    }
)
# The attribute of a settings class naming the Worker subclass to build (arq has no such option:
# `take_over_arq_cli` gives its CLI one).
WORKER_CLASS = "worker_class"


# -- the result record --
# A job's result as arq's worker stores it (what `Job.result_info` reads): arq's
# `serialize_result`, which the engine calls with every field named (arq takes eleven
# positionally); test_arqcompat checks the names. An alias, not a wrapper: one call per job.
result_record = serialize_result


# -- the Worker's private parts --
class SeamWorker(Worker):
    """arq's Worker with the private parts the engine replaces turned into hooks of ours.

    arq's main loop calls its private `_poll_iteration` once per turn: here that is
    `poll_turn()`. arq's `close` gathers the job tasks between steps that read private
    attributes: here it is the same steps, with `wait_for_jobs()` where arq gathers. Both hooks
    do what arq does until a subclass overrides them. The one private name the engine reads,
    `_jobs_started`, is the property `jobs_started`. Nothing here runs per job."""

    async def _poll_iteration(self) -> None:  # arq's: one turn of `Worker.main`'s loop
        await self.poll_turn()

    async def poll_turn(self) -> None:
        """One turn of the worker's main loop: claim jobs, cancel aborted ones, heart beat."""
        await super()._poll_iteration()

    async def close(self) -> None:
        """arq 0.28's `close`, step for step, waiting for jobs through `wait_for_jobs`."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        await self.wait_for_jobs()
        await self.pool.delete(self.health_check_key)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        await self.pool.aclose(close_connection_pool=True)  # arq's `close` is deprecated
        self._pool = None

    async def wait_for_jobs(self) -> None:
        """The worker is closing: wait for its job tasks (arq's: the first error raises)."""
        await asyncio.gather(*self.tasks.values())

    @property
    def jobs_started(self) -> int:
        """Jobs this worker started, ended or not: what `max_burst_jobs` counts."""
        return self._jobs_started()


# -- arq's CLI --
def arq_cli_is_importing() -> bool:
    """Whether arq's CLI (`arq ...`, `python -m arq ...`, with or without --watch) is on the
    call stack: it imports the settings module it is given before anything else."""
    cli_code = cast(Callable[..., Any], arq.cli.cli.callback).__code__
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is cli_code:
            return True
        frame = frame.f_back
    return False


def take_over_arq_cli(
    *, log_config: Callable[[bool], dict[str, Any]], prepare: Callable[[], object]
) -> bool:
    """For a settings module to call at import: if arq's CLI is the importer, make this process
    run the worker as the project's settings say; anywhere else do nothing. Whether it did.

    arq 0.28's CLI always builds arq's own Worker (create_worker -> `Worker(**get_kwargs())`) and
    offers no way to name another class, so this is the one patch of arq left: its
    `create_worker` builds the class a settings class names in `worker_class`, and arq's Worker
    for any other settings. Also, in that process only:
    - `log_config` becomes the CLI's default, which it reads right after the import (so `-v`,
      `--custom-log-dict` and `--check` keep their meaning);
    - `prepare()` runs now, before the CLI makes its event loop (--watch makes it before it
      builds the worker): uvloop."""
    if not arq_cli_is_importing():
        return False
    arq.cli.default_log_config = log_config  # type: ignore[attr-defined,assignment]
    prepare()
    arq.worker.create_worker = create_worker  # run_worker calls it
    arq.cli.create_worker = create_worker  # type: ignore[attr-defined]  # --watch calls it
    return True


_arq_create_worker = arq.worker.create_worker


def create_worker(settings_cls: WorkerSettingsType, **kwargs: Any) -> Worker:
    """arq's `create_worker`, building the class a settings class names in `worker_class` and
    arq's own Worker for any other settings."""
    if isinstance(settings_cls, dict):
        worker_class = settings_cls.get(WORKER_CLASS)
    else:
        worker_class = getattr(settings_cls, WORKER_CLASS, None)
    if worker_class is None:
        return _arq_create_worker(settings_cls, **kwargs)
    return cast(Worker, worker_class(**{**arq.worker.get_kwargs(settings_cls), **kwargs}))
