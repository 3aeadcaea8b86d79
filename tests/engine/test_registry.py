"""The job registry: what `@job` makes of a function, the errors a declaration can have, and
the one line the worker and the API stop with when JOB_MODULES cannot be loaded."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from arq.connections import ArqRedis
from pydantic import BaseModel, ValidationError

import jobs.builtins  # noqa: F401  (the built-ins registered, as in the worker and the API)
from app.web import create_app
from asyncjobs import JobContext, job
from asyncjobs.keys import COUNTERS_KEY
from asyncjobs.registry import (
    JobRegistrationError,
    RetryPolicy,
    get_job_type,
    job_types,
    load_job_modules,
    unregister,
)
from asyncjobs.settings import Settings
from tests.conftest import API_KEY, TEST_REDIS_URL
from tests.faults.procs import service_env
from tests.helpers import api_client, free_port

BUILTINS = {
    "send_email", "send_newsletter", "scrape", "scrape_source", "export", "report",
    "process_image", "deliver_webhook", "daily_cleanup", "daily_report", "http",
}  # fmt: skip


@pytest.fixture
def declared() -> Iterator[list[str]]:
    """Names a test declares, forgotten afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        unregister(name)


def test_every_built_in_is_declared_in_the_registry() -> None:
    builtins = {t.name for t in job_types() if t.builtin}
    assert builtins == BUILTINS
    assert get_job_type("send_email").priority == "transactional"  # type: ignore[union-attr]
    assert get_job_type("send_newsletter").priority == "bulk"  # type: ignore[union-attr]


def test_a_signature_becomes_the_arguments_model(declared: list[str]) -> None:
    @job(tries=4, backoff=(1, 8), lifetime=60, priority="transactional", cost=3)
    async def render_report(ctx: JobContext, report_id: int, pages: list[str] = []) -> str:  # noqa: B006
        """Render a report.

        More words."""
        return ""

    declared.append("render_report")
    spec = get_job_type("render_report")
    assert spec is not None and spec.takes_context and not spec.builtin
    assert spec.summary == "Render a report."
    assert spec.retry == RetryPolicy(max_tries=4, base_delay=1, max_delay=8, lifetime=60)
    assert (spec.priority, spec.cost, spec.schedulable) == ("transactional", 3, True)
    model = spec.validate({"report_id": "12"})
    assert spec.call_arguments(model) == {"report_id": 12, "pages": []}
    with pytest.raises(ValidationError) as refused:
        spec.validate({"report_id": 1, "colour": "red"})
    assert refused.value.errors()[0]["loc"] == ("colour",)
    assert spec.result_schema() == {"type": "string"}


class Order(BaseModel):  # module level: `ship`'s annotation names it
    order_id: int


def test_one_model_parameter_is_the_arguments_model(declared: list[str]) -> None:
    @job(name="ship_order")
    async def ship(order: Order) -> None:
        return None

    declared.append("ship_order")
    spec = get_job_type("ship_order")
    assert spec is not None and spec.arguments is Order and not spec.takes_context
    assert spec.call_arguments(spec.validate({"order_id": 5})) == {"order": Order(order_id=5)}
    assert ship.asyncjobs_job_name == "ship_order"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("declare", "message"),
    [
        (lambda: job(cast(Any, _plain)), "must be an `async def` function"),
        (lambda: job(name="Bad-Name")(_coroutine), "must be lowercase letters"),
        (lambda: job(name="send_email")(_coroutine), "clashes with the built-in job"),
        (lambda: job(name="no_tries", tries=0)(_coroutine), "tries >= 1"),
    ],
)
def test_a_bad_declaration_is_an_error_that_says_why(declare: Any, message: str) -> None:
    with pytest.raises(JobRegistrationError, match=message):
        declare()
    assert get_job_type("send_email").builtin  # type: ignore[union-attr]  # untouched


async def _coroutine(ctx: JobContext) -> None:
    return None


def _plain() -> None:  # not a coroutine function
    return None


def test_the_same_name_from_two_functions_is_an_error_naming_both(declared: list[str]) -> None:
    async def first() -> None:
        return None

    async def second() -> None:
        return None

    job(name="twice")(first)
    declared.append("twice")
    job(name="twice")(first)  # the same function again (a module imported twice): fine
    with pytest.raises(JobRegistrationError) as clash:
        job(name="twice")(second)
    assert "second" in str(clash.value) and "first" in str(clash.value)


def test_a_module_that_fails_to_import_is_named(tmp_path: Path, monkeypatch: Any) -> None:
    (tmp_path / "broken_tasks.py").write_text("import not_a_module_anywhere\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(JobRegistrationError) as failed:
        load_job_modules(["broken_tasks"])
    assert str(failed.value) == (
        "JOB_MODULES: module 'broken_tasks' failed to import: "
        "ModuleNotFoundError: No module named 'not_a_module_anywhere'"
    )


@pytest.mark.parametrize(
    "command",
    [["arq", "worker_settings.WorkerSettings"], ["asyncjobs", "web"]],
    ids=["worker", "web"],
)
@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("missing_tasks", "error: JOB_MODULES: module 'missing_tasks' failed to import"),
        (
            "clashing_tasks",
            "error: job name 'send_email' of clashing_tasks.send_email clashes "
            "with the built-in job jobs.mail.email.send_email",
        ),
    ],
    ids=["missing", "clash"],
)
async def test_start_up_stops_with_one_line(
    command: list[str], module: str, expected: str, tmp_path: Path
) -> None:
    (tmp_path / "clashing_tasks.py").write_text(
        "from asyncjobs import job\n\n\n@job\nasync def send_email() -> None:\n    pass\n"
    )
    env = service_env(redis_url=TEST_REDIS_URL, api_keys=API_KEY, web_port=free_port())
    env |= {"JOB_MODULES": module}
    env.pop("PYTHONPATH")
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / command[0]), *command[1:], cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    text = output.decode()
    assert process.returncode not in (0, None)
    assert text.strip().splitlines()[-1].startswith(expected), text
    assert "Traceback" not in text


async def test_a_users_job_is_charged_its_cost_against_the_rate_limit(
    declared: list[str], make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    """cost=4 with RATE_LIMIT_REQUESTS=10: two calls fit (8), the third is a 429 and is not
    enqueued."""
    job(name="heavy_export", cost=4)(_coroutine_with_argument)
    declared.append("heavy_export")
    settings = make_settings(rate_limit_requests=10, rate_limit_window=3600)
    async with api_client(create_app(settings)) as api:
        statuses = [
            (await api.post("/jobs/heavy_export", json={"rows": n})).status for n in range(3)
        ]
    assert statuses == [202, 202, 429]
    counted = await redis.hget(COUNTERS_KEY, "enqueued|heavy_export")  # type: ignore[misc]
    assert int(counted) == 2


async def _coroutine_with_argument(rows: int) -> int:
    return rows
