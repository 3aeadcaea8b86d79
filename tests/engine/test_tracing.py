"""OpenTelemetry traces (asyncjobs/tracing.py), read back from the SDK's in-memory exporter: off
unless the OTEL_* variables say so, a request followed through the queue to the SMTP server,
retries linked to their enqueue, schedules starting traces of their own, log lines with ids."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from arq.connections import ArqRedis
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from asyncjobs import JobContext, TransientJobError, job, tracing
from asyncjobs.logs import JsonFormatter
from asyncjobs.registry import unregister
from asyncjobs.settings import Settings
from jobs.context import WorkerContext
from jobs.engine.queue import enqueue_job
from jobs.mail.smtp import SmtpPool
from jobs.schedules import ScheduleSpec, new_schedule, run_due_schedules, save_schedule
from jobs.values import now_utc
from jobs.webhooks import deliver_webhook
from tests.conftest import LOOPBACK, api_and_worker, start_worker, stop_worker
from tests.helpers import wait_for
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler

ROOT = Path(__file__).resolve().parents[2]

# OpenTelemetry sets its global provider once per process: one for the module, emptied per test.
_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory, for this test (before any app or worker is made)."""
    _EXPORTER.clear()
    tracing.setup_tracing("asyncjobs-test", tracer_provider=_PROVIDER)
    try:
        yield _EXPORTER
    finally:
        tracing.reset_tracing()
        _EXPORTER.clear()


def ended(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return list(exporter.get_finished_spans())


def named(exporter: InMemorySpanExporter, prefix: str) -> list[ReadableSpan]:
    return [s for s in ended(exporter) if s.name.startswith(prefix)]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent else None


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


async def spans_appear(
    exporter: InMemorySpanExporter, check: Callable[[list[ReadableSpan]], bool], what: str
) -> list[ReadableSpan]:
    async def ready() -> list[ReadableSpan] | None:
        found = ended(exporter)
        return found if check(found) else None

    return await wait_for(ready, what=what)


# --- off unless configured ----------------------------------------------------------------------


def test_off_by_default_every_function_is_a_no_op() -> None:
    tracing.reset_tracing()
    assert tracing.setup_tracing("asyncjobs-test") is False  # no OTEL_* variable here
    kwargs: dict[str, Any] = {"to": "a@example.com"}
    with tracing.send_span("send_email"):
        tracing.inject_trace(kwargs, "arq:queue", "j1")
    assert kwargs == {"to": "a@example.com"}
    assert tracing.outbound_headers() == {}
    assert tracing.send_span("x") is tracing.process_span("x", "j", 1, None)  # one shared no-op
    with tracing.client_span("smtp send", "http://h/"), tracing.span("step"):
        tracing.record_error(ValueError("nothing to record"))
    tracing.reset_tracing()


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_only_the_standard_variables_turn_it_on(environ: dict[str, str], on: bool) -> None:
    assert tracing.configured_by_environment(environ) is on


def run_python(code: str, **environ: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", **environ}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done


LOADED = "print(sorted(m for m, v in sys.modules.items() if m.startswith('opentelemetry') and v))"


def test_without_the_extra_it_stays_off_and_says_why() -> None:
    """OpenTelemetry made unimportable, as where the extra is not installed."""
    code = (
        "import sys, logging; sys.modules['opentelemetry'] = None\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from asyncjobs import tracing\n"
        "print(tracing.setup_tracing('x'), tracing.outbound_headers())\n"
    )
    done = run_python(code, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9/")
    assert done.stdout.splitlines() == ["False {}"]
    assert "pip install 'asyncjobs[otel]'" in done.stderr


def test_off_opentelemetry_is_not_even_imported() -> None:
    code = (
        "import sys\n"
        "from app.web import create_app\n"
        "from asyncjobs.settings import Settings\n"
        "create_app(Settings(_env_file=None))\n" + LOADED
    )
    assert run_python(code).stdout.splitlines() == ["[]"]


def test_configured_by_the_environment_it_exports_and_names_the_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The provider the variables describe (console exporter, service name): built only."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    provider = tracing._provider_from_environment("asyncjobs-worker")
    if provider is not _PROVIDER:  # else the global one an earlier test set, used as it is
        assert isinstance(provider, TracerProvider)
        assert provider.resource.attributes["service.name"] == "asyncjobs-worker"
        provider.shutdown()


# --- the trace through a job, without the engine ------------------------------------------------


def test_the_enqueue_carries_its_span_and_the_first_try_is_its_child(
    spans: InMemorySpanExporter,
) -> None:
    kwargs: dict[str, Any] = {"to": "a@example.com"}
    with tracing.send_span("send_email"):
        tracing.inject_trace(kwargs, "arq:queue", "job-1")
    carrier = kwargs.pop(tracing.TRACE_KWARG)
    assert set(carrier) >= {"traceparent"}
    for try_ in (1, 2):
        with tracing.process_span("send_email", "job-1", try_, carrier, "arq:queue"):
            pass
    [send] = named(spans, "send")
    first, second = named(spans, "process")
    assert send.name == "send arq:queue" and send.kind == SpanKind.PRODUCER
    assert send.attributes is not None and first.attributes is not None
    assert send.attributes["messaging.system"] == "asyncjobs"
    assert send.attributes["messaging.destination.name"] == "arq:queue"
    assert send.attributes["messaging.message.id"] == "job-1"
    assert first.name == "process arq:queue" and first.kind == SpanKind.CONSUMER
    assert first.attributes["messaging.message.id"] == "job-1"
    assert first.attributes["asyncjobs.job.try"] == 1
    assert carrier["traceparent"].split("-")[2] == format(span_id(send), "016x")
    assert parent_id(first) == span_id(send) and trace_id(first) == trace_id(send)
    assert second.parent is None and trace_id(second) != trace_id(send)  # a retry: its own trace
    for process in (first, second):
        assert [link.context.span_id for link in process.links] == [span_id(send)]


def test_a_failed_try_marks_its_span_and_a_postponed_one_does_not(
    spans: InMemorySpanExporter,
) -> None:
    from asyncjobs.errors import Postpone

    with pytest.raises(TransientJobError), tracing.process_span("f", "j", 1, None):
        raise TransientJobError("the provider is down")
    with pytest.raises(Postpone), tracing.process_span("f", "j", 1, None):
        raise Postpone(1.0, "later")
    failed, postponed = named(spans, "process")
    assert failed.status.status_code == trace.StatusCode.ERROR
    assert failed.status.description == "the provider is down"
    assert [e.name for e in failed.events] == ["exception"]
    assert postponed.status.status_code == trace.StatusCode.UNSET
    assert [e.name for e in postponed.events] == ["postponed"]


def test_log_lines_inside_a_span_carry_its_ids(
    spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("asyncjobs.test")
    with caplog.at_level(logging.INFO, logger="asyncjobs.test"):
        logger.info("outside")
        with tracing.span("step"):
            logger.info("inside")
    outside, inside = caplog.records
    [step] = named(spans, "step")
    assert not hasattr(outside, "trace_id")
    line = json.loads(JsonFormatter().format(inside))
    assert line["trace_id"] == format(trace_id(step), "032x")
    assert line["span_id"] == format(span_id(step), "016x")


async def test_redis_commands_are_spans_inside_a_trace_only(
    spans: InMemorySpanExporter, redis: ArqRedis
) -> None:
    await redis.get("tracing:outside")  # a worker's poll, say: no trace of its own
    with tracing.span("job"):
        await redis.get("tracing:inside")
    [step] = named(spans, "job")
    commands = [s for s in ended(spans) if s.name == "GET"]
    assert [parent_id(s) for s in commands] == [span_id(step)]


async def test_an_smtp_send_is_a_client_span(
    spans: InMemorySpanExporter, settings: Settings, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    from email.message import EmailMessage

    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@example.com", "b@example.com", "hi"
    message.set_content("hello")
    pool = SmtpPool(settings)
    try:
        with tracing.span("job"):
            await pool.send(message, ["b@example.com"])
    finally:
        await pool.close()
    [step] = named(spans, "job")
    [send] = named(spans, "smtp send")
    assert send.kind == SpanKind.CLIENT and parent_id(send) == span_id(step)
    assert send.attributes is not None and send.attributes["server.port"] == smtp[1]


@pytest.fixture
async def echo() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A loopback receiver that keeps each request's headers."""
    seen: list[dict[str, str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}", seen
    finally:
        await server.close()


async def test_a_webhook_is_a_span_and_carries_traceparent(
    spans: InMemorySpanExporter,
    make_ctx: Callable[..., WorkerContext],
    echo: tuple[str, list[dict[str, str]]],
) -> None:
    base, seen = echo
    ctx = make_ctx(job_id="j1", webhook_secret="s3cret")
    with tracing.span("job"):
        status = await deliver_webhook(
            ctx, url=f"{base}/hook?token=secret", payload={"job_id": "j0", "status": "complete"}
        )
    assert status == 204
    [hook] = named(spans, "webhook")
    assert hook.kind == SpanKind.CLIENT and hook.attributes is not None
    assert hook.attributes["url.full"] == f"{base}/hook"  # no query: it may hold a token
    assert hook.attributes["http.response.status_code"] == 204
    [headers] = seen
    assert headers["traceparent"].split("-")[1] == format(trace_id(hook), "032x")


async def test_an_http_job_is_a_span_and_carries_traceparent(
    spans: InMemorySpanExporter,
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    echo: tuple[str, list[dict[str, str]]],
) -> None:
    base, seen = echo
    settings = make_settings(
        http_jobs_secret="s3cret", http_jobs_allowed_cidrs=LOOPBACK, http_jobs_allowed_ports=None
    )
    async with api_and_worker(settings) as api:
        response = await api.post("/jobs/http", json={"url": f"{base}/call", "method": "POST"})
        assert response.status == 202, await response.text()
        job_id = (await response.json())["job_id"]
        assert (await wait_job(api, job_id))["status"] == "complete"
    [call] = named(spans, "http job")
    assert call.kind == SpanKind.CLIENT and call.attributes is not None
    assert call.attributes["http.request.method"] == "POST"
    [headers] = seen
    assert headers["traceparent"].split("-")[1] == format(trace_id(call), "032x")


# --- end to end: the engine's call sites --------------------------------------------------------


async def test_one_email_is_one_trace_from_the_api_to_the_smtp_server(
    spans: InMemorySpanExporter, settings: Settings, redis: ArqRedis
) -> None:
    """POST /jobs/email: the API's span, the enqueue, the worker's span as its child, the SMTP
    send; one trace id."""
    async with api_and_worker(settings) as api:
        response = await api.post(
            "/jobs/email", json={"to": "a@example.com", "subject": "Hi", "text": "Hello"}
        )
        assert response.status == 202, await response.text()
        job_id = (await response.json())["job_id"]
        assert (await wait_job(api, job_id))["status"] == "complete"
        await spans_appear(spans, lambda s: any(x.name == "smtp send" for x in s), "smtp span")
        await spans_appear(spans, lambda s: any(x.name.startswith("process") for x in s), "proc")
    [server] = [
        s for s in ended(spans) if s.kind == SpanKind.SERVER and s.name.endswith("/jobs/email")
    ]
    [send] = named(spans, "send")
    [process] = named(spans, "process")
    [smtp_send] = named(spans, "smtp send")
    assert parent_id(send) == span_id(server)
    assert parent_id(process) == span_id(send)
    assert parent_id(smtp_send) == span_id(process)
    assert process.attributes is not None and process.attributes["messaging.message.id"] == job_id
    assert len({trace_id(s) for s in (server, send, process, smtp_send)}) == 1


async def test_a_job_failing_twice_then_succeeding_is_three_tries_linked_to_one_enqueue(
    spans: InMemorySpanExporter,
    settings: Settings,
    redis: ArqRedis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A user's own job: its span for free, its own child span, its log lines with the ids."""
    tries: list[int] = []

    @job(name="tracing_flaky", tries=3, backoff=(0.05, 0.05))
    async def tracing_flaky(ctx: JobContext, n: int) -> int:
        tries.append(ctx.job_try)
        with trace.get_tracer("user.code").start_as_current_span("my step"):
            logging.getLogger("user.code").warning("try %d", ctx.job_try)
        if ctx.job_try < 3:
            raise TransientJobError("not yet")
        return n

    try:
        worker, task = await start_worker(settings, cron_jobs=[])
        try:
            with caplog.at_level(logging.INFO, logger="user.code"):
                job_id = await enqueue_job(redis, "tracing_flaky", n=7)
                assert job_id is not None
                await spans_appear(spans, lambda s: len(named(spans, "process")) == 3, "3 tries")
        finally:
            await stop_worker(worker, task)
    finally:
        unregister("tracing_flaky")
    assert tries == [1, 2, 3]
    [send] = named(spans, "send")
    processes = sorted(named(spans, "process"), key=lambda s: s.start_time or 0)
    assert [p.attributes["asyncjobs.job.try"] for p in processes if p.attributes] == [1, 2, 3]
    for process in processes:
        assert [link.context.span_id for link in process.links] == [span_id(send)]
    assert parent_id(processes[0]) == span_id(send)
    assert [p.parent for p in processes[1:]] == [None, None]
    assert [p.status.status_code for p in processes] == [
        trace.StatusCode.ERROR, trace.StatusCode.ERROR, trace.StatusCode.UNSET,
    ]  # fmt: skip
    steps = named(spans, "my step")
    assert sorted(parent_id(s) or 0 for s in steps) == sorted(span_id(p) for p in processes)
    lines = [r for r in caplog.records if r.name == "user.code"]
    assert [getattr(r, "trace_id", None) for r in lines] == [
        format(trace_id(p), "032x") for p in processes
    ]


async def test_a_schedules_run_starts_a_trace_of_its_own_naming_it(
    spans: InMemorySpanExporter, settings: Settings, redis: ArqRedis
) -> None:
    spec = ScheduleSpec.model_validate(
        {"name": "nightly digest", "every": 60, "job": {"type": "email", "body": {
            "to": "a@example.com", "subject": "Digest", "text": "news"}}}
    )  # fmt: skip
    schedule = new_schedule(spec, None)
    schedule = schedule.model_copy(update={"created_at": schedule.created_at.replace(year=2000)})
    await save_schedule(redis, schedule)
    with tracing.span("tick"):  # the cron tick's span, as the worker's run of run_schedules
        assert await run_due_schedules(redis, settings, now_utc()) == [schedule.id]
    [tick] = named(spans, "tick")
    [run] = named(spans, "schedule ")
    assert run.name == "schedule nightly digest"
    assert run.parent is None and trace_id(run) != trace_id(tick)
    assert [link.context.span_id for link in run.links] == [span_id(tick)]
    assert run.attributes is not None and run.attributes["asyncjobs.schedule.id"] == schedule.id
    [send] = named(spans, "send")  # the run's enqueue is in its trace
    assert parent_id(send) == span_id(run)


async def test_no_trace_kwarg_reaches_a_job_when_tracing_is_off(
    settings: Settings, redis: ArqRedis
) -> None:
    """Tracing off (the default): the job's record is as before."""
    tracing.reset_tracing()
    job_id = await enqueue_job(redis, "send_email", to="a@example.com")
    raw = await redis.get(f"arq:job:{job_id}")
    assert raw is not None and tracing.TRACE_KWARG.encode() not in raw
