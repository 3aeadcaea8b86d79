"""Each assumption asyncjobs/arqcompat.py makes about arq, checked against the installed arq: an
arq upgrade that breaks one fails here first, with a message naming it."""

from __future__ import annotations

import ast
import asyncio
import dataclasses
import inspect
import logging
import pickle
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import arq.cli
import arq.worker
import pytest
from arq.cron import CronJob
from arq.jobs import JobResult, deserialize_result, serialize_job
from arq.worker import Function, Worker, func

from asyncjobs import arqcompat
from asyncjobs.arqcompat import SeamWorker
from asyncjobs.settings import Settings
from jobs.engine import queue
from jobs.engine.worker import EngineWorker
from jobs.worker import worker_options

ENGINE = Path(__file__).resolve().parents[2] / "jobs" / "engine"
UPGRADE = "arq changed: see asyncjobs/arqcompat.py"


async def noop(ctx: dict[str, Any]) -> None:
    return None


def plain_worker(**options: Any) -> Worker:
    return Worker(functions=[func(noop, name="noop")], handle_signals=False, **options)


def code_names(function: Callable[..., Any]) -> set[str]:
    return set(function.__code__.co_names)


# -- the key layout and clock helpers --
def test_the_key_layout_is_the_one_the_scripts_use() -> None:
    assert {
        "abort_jobs_ss": arqcompat.abort_jobs_ss,
        "default_queue_name": arqcompat.default_queue_name,
        "health_check_key_suffix": arqcompat.health_check_key_suffix,
        "in_progress_key_prefix": arqcompat.in_progress_key_prefix,
        "job_key_prefix": arqcompat.job_key_prefix,
        "result_key_prefix": arqcompat.result_key_prefix,
        "retry_key_prefix": arqcompat.retry_key_prefix,
    } == {
        "abort_jobs_ss": "arq:abort",
        "default_queue_name": "arq:queue",
        "health_check_key_suffix": ":health-check",
        "in_progress_key_prefix": "arq:in-progress:",
        "job_key_prefix": "arq:job:",
        "result_key_prefix": "arq:result:",
        "retry_key_prefix": "arq:retry:",
    }, UPGRADE


def test_the_engine_keeps_keys_as_long_as_arq() -> None:
    assert arqcompat.keep_cronjob_progress == 60, UPGRADE
    assert arqcompat.expires_extra_ms == queue.KEEP_AFTER_NEXT_TRY_MS, UPGRADE
    # arq's run_job keeps a job's try count this long (a literal in its code)
    assert queue.RETRY_KEY_TTL_S in Worker.run_job.__code__.co_consts, UPGRADE


def test_the_clock_helpers_count_milliseconds_since_the_epoch() -> None:
    assert abs(arqcompat.timestamp_ms() - datetime.now(UTC).timestamp() * 1000) < 5000
    assert arqcompat.to_ms(1.5) == 1500 and arqcompat.to_ms(None) is None
    assert arqcompat.ms_to_datetime(86_400_000) == datetime(1970, 1, 2, tzinfo=UTC)


# -- the records --
def test_a_job_record_reads_as_five_fields() -> None:
    raw = serialize_job("send", ("a",), {"k": 1}, 3, 1234)
    assert arqcompat.deserialize_job_raw(raw) == ("send", ("a",), {"k": 1}, 3, 1234), UPGRADE
    with pytest.raises(arqcompat.SerializationError):
        arqcompat.deserialize_job_raw(b"not a job")


def test_the_result_record_names_arqs_fields() -> None:
    assert list(inspect.signature(arqcompat.result_record).parameters) == [
        "function", "args", "kwargs", "job_try", "enqueue_time_ms", "success", "result",
        "start_ms", "finished_ms", "ref", "queue_name", "job_id", "serializer",
    ], UPGRADE  # fmt: skip
    fields: dict[str, Any] = {
        "function": "send", "args": ("a",), "kwargs": {"k": 1}, "job_try": 2,
        "enqueue_time_ms": 1000, "success": True, "result": "ok", "start_ms": 2000,
        "finished_ms": 3000, "ref": "j1:send", "queue_name": "q", "job_id": "j1",
    }  # fmt: skip
    data = arqcompat.result_record(**fields, serializer=None)
    assert data is not None
    read = deserialize_result(data)
    assert [f.name for f in dataclasses.fields(JobResult)] == [
        "function", "args", "kwargs", "job_try", "enqueue_time", "score", "job_id",
        "success", "result", "start_time", "finish_time", "queue_name",
    ], UPGRADE  # fmt: skip
    assert (read.function, read.args, read.kwargs, read.job_try) == ("send", ("a",), {"k": 1}, 2)
    assert (read.success, read.result, read.queue_name, read.job_id) == (True, "ok", "q", "j1")
    assert read.enqueue_time == arqcompat.ms_to_datetime(1000)
    assert (read.start_time, read.finish_time) == tuple(map(arqcompat.ms_to_datetime, (2000, 3000)))
    assert pickle.loads(data)["t"] == 2  # arq's default serializer


def test_what_the_engine_reads_of_a_function() -> None:
    needed = {"name", "coroutine", "timeout_s", "keep_result_s", "keep_result_forever"}
    for kind in (Function, CronJob):
        assert needed <= {f.name for f in dataclasses.fields(kind)}, f"{UPGRADE}: {kind}"


def test_arqs_exceptions_take_a_message() -> None:
    assert str(arqcompat.JobExecutionFailed("job expired")) == "job expired"
    assert isinstance(arqcompat.RetryJob(), BaseException)
    assert logging.getLogger(arqcompat.WORKER_LOGGER) is arq.worker.logger


# -- the Worker's private parts --
def test_arqs_main_loop_calls_the_private_step_seam_worker_routes() -> None:
    step = Worker._poll_iteration
    assert inspect.iscoroutinefunction(step), UPGRADE
    assert list(inspect.signature(step).parameters) == ["self"], UPGRADE
    # main() runs `_poll_iteration` every `poll_delay_s` (EngineWorker sets it to 0 and waits)
    assert {"_poll_iteration", "poll_delay_s"} <= code_names(Worker.main), UPGRADE
    assert "_poll_iteration" in SeamWorker.__dict__


def test_seam_workers_close_is_arqs_step_for_step() -> None:
    """SeamWorker.close copies arq's; a change to arq's must be looked at (and copied)."""
    assert code_names(Worker.close) == {
        "SIGUSR1", "_handle_signals", "_pool", "asyncio", "close", "ctx", "delete", "gather",
        "handle_sig", "health_check_key", "on_shutdown", "pool", "signal", "tasks", "values",
    }, UPGRADE  # fmt: skip
    ours = code_names(SeamWorker.close) - {"wait_for_jobs", "aclose"}
    assert ours == code_names(Worker.close) - {"asyncio", "gather", "tasks", "values", "close"}


async def test_the_private_attributes_seam_worker_reads_exist() -> None:
    worker = plain_worker()
    assert worker._handle_signals is False and worker._pool is None, UPGRADE
    assert worker._jobs_started() == 0, UPGRADE
    assert list(inspect.signature(Worker._jobs_started).parameters) == ["self"], UPGRADE


async def test_every_worker_attribute_the_engine_uses_exists_on_a_real_worker() -> None:
    worker = plain_worker(allow_abort_jobs=True)
    missing = {name for name in arqcompat.WORKER_ATTRIBUTES if not hasattr(worker, name)}
    assert not missing, f"{UPGRADE}: Worker has no {sorted(missing)}"
    assert not any(name.startswith("_") for name in arqcompat.WORKER_ATTRIBUTES)


def engine_attribute_uses() -> set[str]:
    """What jobs/engine/runner.py reads of `worker`/`w`/`self.worker`, and EngineWorker of
    `self`."""
    used: set[str] = set()
    for node in ast.walk(ast.parse((ENGINE / "runner.py").read_text())):
        if isinstance(node, ast.Attribute):
            owner = node.value
            named = isinstance(owner, ast.Name) and owner.id in ("worker", "w")
            if named or (isinstance(owner, ast.Attribute) and owner.attr == "worker"):
                used.add(node.attr)
    module = ast.parse((ENGINE / "worker.py").read_text())
    [engine_worker] = [c for c in module.body if getattr(c, "name", "") == "EngineWorker"]
    for node in ast.walk(engine_worker):
        if isinstance(node, ast.Attribute) and getattr(node.value, "id", "") == "self":
            used.add(node.attr)
    return used


async def test_the_engine_uses_arqs_worker_only_through_the_seam() -> None:
    """Every name the engine uses on its worker is arq's documented API, one of the seam's, or
    one of WORKER_ATTRIBUTES: no private name of arq's outside arqcompat."""
    settings = Settings(_env_file=None)
    worker = EngineWorker(**worker_options(settings) | {"handle_signals": False})
    own = set(vars(worker)) - set(vars(plain_worker()))  # what EngineWorker.__init__ adds
    seams = set(vars(EngineWorker)) | set(vars(SeamWorker))
    others = engine_attribute_uses() - own - seams - arqcompat.WORKER_ATTRIBUTES
    assert not others, f"the engine uses {sorted(others)} of arq's Worker: name them in arqcompat"


async def test_worker_options_are_all_worker_parameters() -> None:
    """arq's get_kwargs drops, silently, every setting that is not a Worker parameter."""
    parameters = set(inspect.signature(Worker).parameters)
    options = worker_options(Settings(_env_file=None))
    assert set(options) <= parameters, UPGRADE
    assert arqcompat.WORKER_CLASS not in parameters  # arq would take it as its own


# -- arq's CLI --
def test_arqs_cli_imports_the_settings_before_anything_else() -> None:
    source = inspect.getsource(cast(Callable[..., Any], arq.cli.cli.callback))
    imported = source.index("import_string(worker_settings)")
    assert imported < source.index("default_log_config(verbose)"), UPGRADE
    assert imported < source.index("run_worker("), UPGRADE
    assert imported < source.index("asyncio.run(watch_reload("), UPGRADE  # --watch


def test_arqs_cli_builds_workers_through_create_worker() -> None:
    assert vars(arq.cli)["run_worker"] is arq.worker.run_worker, UPGRADE
    assert "create_worker" in code_names(arq.worker.run_worker), UPGRADE  # arq.worker's global
    assert "create_worker" in code_names(arq.cli.watch_reload), UPGRADE  # arq.cli's global
    assert code_names(arq.worker.create_worker) == {"Worker", "get_kwargs"}, UPGRADE
    create_parameters = list(inspect.signature(arq.worker.create_worker).parameters)
    assert create_parameters == ["settings_cls", "kwargs"], UPGRADE
    assert list(inspect.signature(arq.worker.get_kwargs).parameters) == ["settings_cls"], UPGRADE


def test_the_cli_is_seen_on_the_stack_only_while_it_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """arq's CLI callback, its import of the settings stopped there: the seam sees it."""
    seen: list[bool] = []

    class Stop(Exception):
        pass

    def import_string(path: str) -> object:
        seen.append(arqcompat.arq_cli_is_importing())
        raise Stop

    monkeypatch.setattr(arq.cli, "import_string", import_string)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI appends its working directory
    callback = cast(Callable[..., Any], arq.cli.cli.callback)
    with pytest.raises(Stop):
        callback(
            worker_settings="x.Settings", burst=None, check=False, watch=None, verbose=False,
            custom_log_dict=None,
        )  # fmt: skip
    assert seen == [True], UPGRADE
    assert arqcompat.arq_cli_is_importing() is False


def cli_state() -> tuple[object, ...]:
    """What take_over_arq_cli replaces: the two create_worker names and the CLI's log config."""
    cli = vars(arq.cli)
    return arq.worker.create_worker, cli["create_worker"], cli["default_log_config"]


def test_anywhere_else_take_over_changes_nothing() -> None:
    before = cli_state()
    called: list[bool] = []
    assert not arqcompat.take_over_arq_cli(
        log_config=lambda verbose: {}, prepare=lambda: called.append(True)
    )
    assert cli_state() == before and not called


async def test_create_worker_builds_the_named_class_or_arqs() -> None:
    options = {"functions": [func(noop, name="noop")], "handle_signals": False}
    assert type(arqcompat.create_worker(options)) is Worker
    named = arqcompat.create_worker(options | {arqcompat.WORKER_CLASS: SeamWorker}, burst=True)
    assert type(named) is SeamWorker and named.burst


async def test_building_an_engine_worker_changes_nothing_in_the_process() -> None:
    """Tests and asyncjobs.testing build workers in-process: arq, the loop policy and logging
    stay as they were."""

    def state() -> tuple[object, ...]:
        root = logging.getLogger()
        policy = type(asyncio.get_event_loop_policy())
        return (*cli_state(), policy, list(root.handlers), root.level)

    before = state()
    settings = Settings(_env_file=None)
    worker = EngineWorker(**worker_options(settings) | {"handle_signals": False})
    assert worker.engine.worker is worker
    assert state() == before
