"""OpenTelemetry traces, optional: `pip install 'asyncjobs[otel]'`, then the standard `OTEL_*`
environment variables turn them on (docs/tracing.md).

Off unless configured: without the extra, or without `OTEL_TRACES_EXPORTER` (other than
"none") or an `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`, or with `OTEL_SDK_DISABLED=true`, every
function here returns at its first line (one global read) and nothing of OpenTelemetry is
imported. The API and the worker decide once, at start-up (`setup_tracing`).

On, it instruments the aiohttp server and client and redis-py with the official packages, and
carries the trace through the job: at enqueue the W3C `traceparent` (and `tracestate`) goes in
the job's record (its kwargs, under TRACE_KWARG, which the runner takes out before the
function sees its arguments), and the worker's span is a child of the enqueue's on the first
try and linked to it on every try (a retry starts a trace of its own). Spans follow the
messaging semantic conventions: `send <queue>` (PRODUCER) and `process <queue>` (CONSUMER),
with messaging.system, messaging.destination.name and messaging.message.id (the job's id).

Log lines written inside a span carry `trace_id` and `span_id` (asyncjobs/logs.py prints them).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager
from contextvars import ContextVar
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from asyncjobs.errors import Postpone
from asyncjobs.version import __version__

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

log = logging.getLogger(__name__)

# The job kwarg that carries the enqueue's trace context (a dict: traceparent, tracestate).
TRACE_KWARG = "_trace"
SYSTEM = "asyncjobs"  # messaging.system
# What a span attribute may be (OpenTelemetry's AttributeValue, less its sequences); `object`
# so that `**{...}` of mixed values type-checks; anything else is dropped by OpenTelemetry.
Attribute = object
# The official instrumentations, by their entry-point names (OTEL_PYTHON_DISABLED_INSTRUMENTATIONS
# takes these names).
INSTRUMENTATIONS = {
    "aiohttp-server": "opentelemetry.instrumentation.aiohttp_server:AioHttpServerInstrumentor",
    "aiohttp-client": "opentelemetry.instrumentation.aiohttp_client:AioHttpClientInstrumentor",
    "redis": "opentelemetry.instrumentation.redis:RedisInstrumentor",
}

_NOTHING: AbstractContextManager[None] = contextlib.nullcontext()
_NO_HEADERS: Mapping[str, str] = {}

# None: tracing is off and every function below is a no-op. Set once by setup_tracing.
_tracer: Tracer | None = None
_decided = False
_instrumented: list[Any] = []  # the instrumentors we turned on (reset_tracing turns them off)
_log_factory: tuple[Callable[..., logging.LogRecord], Callable[..., logging.LogRecord]] | None = (
    None  # (the factory we replaced, ours)
)


class _Sending:
    """The send span in progress, so inject_trace can name its queue and message."""

    __slots__ = ("batch", "span")

    def __init__(self, span: Span, batch: bool) -> None:
        self.span = span
        self.batch = batch


_sending: ContextVar[_Sending | None] = ContextVar("asyncjobs_sending", default=None)


def enabled() -> bool:
    return _tracer is not None


def configured_by_environment(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the standard variables ask for traces (no variable of our own)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip():
        return bool(_exporter_names(environ))
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    names = environ.get("OTEL_TRACES_EXPORTER", "").strip() or "otlp"
    return [n for part in names.split(",") if (n := part.strip().lower()) and n != "none"]


def setup_tracing(service_name: str, *, tracer_provider: TracerProvider | None = None) -> bool:
    """Decide, once per process, whether to trace; whether it does. Called by the API's
    create_app and the worker's start-up, before either makes an HTTP session or an app (the
    aiohttp instrumentations apply to those made later). `service_name` is the default
    service.name (OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win).

    `tracer_provider` (tests: one with an in-memory exporter) turns tracing on with it,
    whatever the environment says, replacing an earlier decision."""
    global _decided
    if tracer_provider is None:
        if _decided:
            return enabled()
        _decided = True
        if not configured_by_environment():
            return False
        try:
            provider = _provider_from_environment(service_name)
        except ImportError:
            log.warning(
                "OTEL_* variables ask for traces, but OpenTelemetry is not installed: "
                "pip install 'asyncjobs[otel]'; tracing stays off"
            )
            return False
    else:
        reset_tracing()
        _decided = True
        provider = tracer_provider
    _start(provider)
    return True


def reset_tracing() -> None:
    """Tracing off again, instrumentations removed (tests); the next setup_tracing decides
    anew. The global tracer provider, which OpenTelemetry sets once, stays."""
    global _tracer, _decided, _log_factory
    _tracer = None
    _decided = False
    while _instrumented:
        with contextlib.suppress(Exception):
            _instrumented.pop().uninstrument()
    if _log_factory is not None:
        replaced, ours = _log_factory
        if logging.getLogRecordFactory() is ours:
            logging.setLogRecordFactory(replaced)
        _log_factory = None


def _provider_from_environment(service_name: str) -> TracerProvider:
    """The global SDK provider if one is set (opentelemetry-instrument), else a new one with
    the exporters OTEL_TRACES_EXPORTER names (default otlp, over OTEL_EXPORTER_OTLP_PROTOCOL:
    http/protobuf unless it says grpc), batched; sampler from OTEL_TRACES_SAMPLER."""
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    current = trace.get_tracer_provider()
    if isinstance(current, SdkTracerProvider):
        return current
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    resource = Resource.create({} if named else {"service.name": service_name})
    provider = SdkTracerProvider(resource=resource)
    for name in _exporter_names(os.environ):
        if name == "otlp":
            protocol = (
                os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf"
            ).strip()
            name = "otlp_proto_grpc" if protocol == "grpc" else "otlp_proto_http"
        found = list(entry_points(group="opentelemetry_traces_exporter", name=name))
        if not found:
            log.warning("no OpenTelemetry span exporter named %r is installed; skipped", name)
            continue
        exporter: SpanExporter = found[0].load()()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _start(provider: TracerProvider) -> None:
    global _tracer
    from opentelemetry import trace

    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)  # users' own spans (trace.get_tracer) join ours
    _tracer = provider.get_tracer("asyncjobs", __version__)
    _instrument(provider)
    _add_ids_to_log_records()


def _instrument(provider: TracerProvider) -> None:
    import importlib

    disabled = {
        n.strip()
        for n in os.environ.get("OTEL_PYTHON_DISABLED_INSTRUMENTATIONS", "").split(",")
        if n.strip()
    }
    for name, where in INSTRUMENTATIONS.items():
        if name in disabled:
            continue
        module, _, attribute = where.partition(":")
        try:
            instrumentor = getattr(importlib.import_module(module), attribute)()
        except ImportError:
            log.warning("%s is not instrumented: install asyncjobs[otel]", name)
            continue
        if instrumentor.is_instrumented_by_opentelemetry:
            continue  # someone else did (opentelemetry-instrument): theirs stays
        # Redis commands are traced inside a request or a job only: the worker's polls,
        # lease renewals and heartbeats would otherwise each start a trace.
        traced_by = _child_spans_only(provider) if name == "redis" else provider
        instrumentor.instrument(tracer_provider=traced_by)
        _instrumented.append(instrumentor)


def _child_spans_only(provider: TracerProvider) -> TracerProvider:
    """A provider whose tracers start spans only within a trace (else a non-recording one)."""
    from opentelemetry import trace
    from opentelemetry.context import Context

    def in_trace(context: Context | None) -> bool:
        return trace.get_current_span(context).get_span_context().is_valid

    class ChildTracer(trace.Tracer):
        def __init__(self, inner: trace.Tracer) -> None:
            self._inner = inner

        def start_span(
            self, name: str, context: Context | None = None, *args: Any, **kw: Any
        ) -> Span:
            if not in_trace(context):
                return trace.INVALID_SPAN
            return self._inner.start_span(name, context, *args, **kw)

        @contextlib.contextmanager
        def start_as_current_span(  # type: ignore[override]
            self, name: str, context: Context | None = None, *args: Any, **kw: Any
        ) -> Iterator[Span]:
            if not in_trace(context):
                yield trace.INVALID_SPAN
                return
            with self._inner.start_as_current_span(name, context, *args, **kw) as span:
                yield span

    class ChildProvider(trace.TracerProvider):
        def get_tracer(self, *args: Any, **kw: Any) -> trace.Tracer:
            return ChildTracer(provider.get_tracer(*args, **kw))

    return ChildProvider()


def _add_ids_to_log_records() -> None:
    """Every log record made inside a span gets trace_id and span_id (hex, as exporters and
    Jaeger show them)."""
    global _log_factory
    from opentelemetry import trace

    replaced = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = replaced(*args, **kwargs)
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return record

    logging.setLogRecordFactory(factory)
    _log_factory = (replaced, factory)


# -- the job's trace ------------------------------------------------------------------------


def send_span(function: str, *, batch: int | None = None) -> AbstractContextManager[None]:
    """Around an enqueue (the script call included): a PRODUCER span `send <queue>`, current,
    so inject_trace puts its context in the job. `batch`: how many jobs one call enqueues."""
    if _tracer is None:
        return _NOTHING
    return _send_span(_tracer, function, batch)


@contextlib.contextmanager
def _send_span(tracer: Tracer, function: str, batch: int | None) -> Iterator[None]:
    from opentelemetry.trace import SpanKind

    attributes: dict[str, str | int] = {
        "messaging.system": SYSTEM,
        "messaging.operation.name": "send",
        "messaging.operation.type": "send",
        "asyncjobs.job.function": function,
    }
    if batch is not None:
        attributes["messaging.batch.message_count"] = batch
    with tracer.start_as_current_span(
        "send", kind=SpanKind.PRODUCER, attributes=attributes
    ) as span:
        token = _sending.set(_Sending(span, batch is not None))
        try:
            yield
        finally:
            _sending.reset(token)


def inject_trace(kwargs: MutableMapping[str, Any], queue: str = "", job_id: str = "") -> None:
    """Put the current trace context in a job's kwargs (TRACE_KWARG: traceparent, tracestate),
    and name the send span's queue and message. Nothing when tracing is off."""
    if _tracer is None:
        return
    from opentelemetry import propagate

    sending = _sending.get()
    if sending is not None and queue:
        sending.span.update_name(f"send {queue}")
        sending.span.set_attribute("messaging.destination.name", queue)
        if job_id and not sending.batch:
            sending.span.set_attribute("messaging.message.id", job_id)
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if carrier:
        kwargs[TRACE_KWARG] = carrier


def process_span(
    function: str,
    job_id: str,
    try_: int,
    carrier: Mapping[str, str] | None,
    queue: str = "",
) -> AbstractContextManager[None]:
    """Around one try of a job in the worker: a CONSUMER span `process <queue>`, current, so
    whatever the job does (its log lines, its HTTP and Redis calls, a user's own spans) is in
    it. A child of the enqueue's span on the first try; on later tries a trace of its own;
    linked to the enqueue's span on every try. An exception through it marks it failed."""
    if _tracer is None:
        return _NOTHING
    return _process_span(_tracer, function, job_id, try_, carrier, queue)


@contextlib.contextmanager
def _process_span(
    tracer: Tracer,
    function: str,
    job_id: str,
    try_: int,
    carrier: Mapping[str, str] | None,
    queue: str,
) -> Iterator[None]:
    from opentelemetry import propagate, trace
    from opentelemetry.context import Context

    parent = Context()  # a job enqueued without a trace (a cron tick) starts one
    links = []
    if carrier:
        sent = propagate.extract(carrier)
        span_context = trace.get_current_span(sent).get_span_context()
        if span_context.is_valid:
            links.append(trace.Link(span_context))
            if try_ <= 1:
                parent = sent
    attributes: dict[str, str | int] = {
        "messaging.system": SYSTEM,
        "messaging.operation.name": "process",
        "messaging.operation.type": "process",
        "messaging.message.id": job_id,
        "asyncjobs.job.function": function,
        "asyncjobs.job.try": try_,
    }
    if queue:
        attributes["messaging.destination.name"] = queue
    with tracer.start_as_current_span(
        f"process {queue}" if queue else "process",
        context=parent,
        kind=trace.SpanKind.CONSUMER,
        links=links,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield
        except BaseException as exc:
            _mark_failed(span, exc)
            raise


def record_error(error: BaseException) -> None:
    """Mark the current span (a job's try) failed, with the error as its exception event."""
    if _tracer is None:
        return
    from opentelemetry import trace

    _mark_failed(trace.get_current_span(), error)


def note_outcome(outcome: str) -> None:
    """Name how the current try ended (completed, retried, postponed, failed, cancelled)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attribute("asyncjobs.job.outcome", outcome)


def _mark_failed(span: Span, error: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    if isinstance(error, Postpone):  # not a failure: the job runs later, this was not a try
        span.add_event("postponed", {"asyncjobs.postpone.delay_s": error.delay})
        return
    cause = error.__cause__ if error.__cause__ is not None else error  # Retry from the error
    span.record_exception(cause)
    span.set_status(Status(StatusCode.ERROR, str(cause) or type(cause).__name__))


# -- what a job does ------------------------------------------------------------------------


def client_span(
    name: str, url: object = None, **attributes: Attribute
) -> AbstractContextManager[None]:
    """A CLIENT span around a call the worker makes (an SMTP send, a scrape, a webhook, an
    HTTP job); an exception through it marks it failed. `url` (a str or a yarl URL) adds
    url.full, server.address and server.port, without its user info, query and fragment,
    which may hold secrets."""
    if _tracer is None:
        return _NOTHING
    if url is not None:
        attributes = {**url_attributes(str(url)), **attributes}
    return _span(_tracer, name, attributes, client=True)


def url_attributes(url: str) -> dict[str, str | int]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    shown = f"[{host}]" if ":" in host else host
    port = parts.port
    attributes: dict[str, str | int] = {
        "url.full": f"{parts.scheme}://{shown}{f':{port}' if port else ''}{parts.path}",
        "server.address": host,
    }
    if port or parts.scheme in ("http", "https"):
        attributes["server.port"] = port or (443 if parts.scheme == "https" else 80)
    return attributes


def span(name: str, **attributes: Attribute) -> AbstractContextManager[None]:
    """An INTERNAL child span of the current one: for a job's own steps (a user's job may as
    well use OpenTelemetry's API, `trace.get_tracer(__name__)`, which joins the same trace)."""
    if _tracer is None:
        return _NOTHING
    return _span(_tracer, name, attributes, client=False)


def new_trace(name: str, **attributes: Attribute) -> AbstractContextManager[None]:
    """A span that starts a trace of its own (a schedule's run), linked to the current span
    (the cron tick that started it) if there is one."""
    if _tracer is None:
        return _NOTHING
    return _span(_tracer, name, attributes, client=False, root=True)


@contextlib.contextmanager
def _span(
    tracer: Tracer,
    name: str,
    attributes: Mapping[str, Attribute],
    *,
    client: bool,
    root: bool = False,
) -> Iterator[None]:
    from opentelemetry import trace
    from opentelemetry.context import Context

    links = []
    if root and (current := trace.get_current_span().get_span_context()).is_valid:
        links.append(trace.Link(current))
    with tracer.start_as_current_span(
        name,
        context=Context() if root else None,
        kind=trace.SpanKind.CLIENT if client else trace.SpanKind.INTERNAL,
        attributes=cast("Mapping[str, Any]", attributes),
        links=links,
        record_exception=False,
        set_status_on_exception=False,
    ) as current_span:
        try:
            yield
        except BaseException as exc:
            _mark_failed(current_span, exc)
            raise


def set_attribute(key: str, value: str | int | float | bool) -> None:
    """On the current span (an HTTP answer's status, say)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    trace.get_current_span().set_attribute(key, value)


def outbound_headers() -> Mapping[str, str]:
    """The current trace context as HTTP headers (traceparent, tracestate) for a request the
    worker sends (webhooks, HTTP jobs); empty when tracing is off. Read-only: spread it."""
    if _tracer is None:
        return _NO_HEADERS
    from opentelemetry import propagate

    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers
