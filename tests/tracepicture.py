"""The picture of one email's trace in docs/tracing.md, made by hand (never by pytest):

    TEST_REDIS_URL=redis://127.0.0.1:6379/12 python -m tests.tracepicture

The real API and a real worker in this process, tracing on into the OpenTelemetry SDK's
in-memory exporter, one `POST /jobs/email` delivered to an SMTP server on loopback (aiosmtpd);
the spans of that request's trace drawn as a waterfall (one row per span, indented under its
parent, its bar on the trace's time axis) in a small HTML page, which Chromium (through
Playwright, as tests/screenshots.py) saves as docs/screenshots/email-trace.png. Not Jaeger's UI
(that needs Docker: docs/tracing.md), but the same spans, as recorded. It empties the Redis
database it is given.
"""

from __future__ import annotations

import asyncio
import html
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from arq.connections import ArqRedis, RedisSettings, create_pool
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from playwright.async_api import async_playwright

from app.mailsink import server_port, start_smtp_server
from app.web import create_app
from asyncjobs import tracing
from asyncjobs.settings import Settings
from tests.conftest import API_KEY, TEST_REDIS_URL, start_worker, stop_worker
from tests.dashboard.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS
from tests.helpers import api_client, wait_for
from tests.jobwait import wait_job
from tests.screenshots import OUT, save
from tests.servers import RecordingSmtpHandler

SERVICE = "asyncjobs"  # the API and the worker share this process, so one resource
# Attributes shown under a span's name (others are in the exporter's record, not drawn).
SHOWN = (
    "http.url",  # the aiohttp instrumentations' (older) semantic conventions
    "http.route",
    "http.status_code",
    "messaging.destination.name",
    "messaging.message.id",
    "asyncjobs.job.function",
    "asyncjobs.job.try",
    "asyncjobs.job.outcome",
    "server.address",
    "server.port",
    "asyncjobs.mail.recipients",
    "db.statement",
)
COLOURS = {  # by span kind
    SpanKind.SERVER: "#2f6fb0",
    SpanKind.PRODUCER: "#c77c1e",
    SpanKind.CONSUMER: "#7a4fb0",
    SpanKind.CLIENT: "#2e8b57",
    SpanKind.INTERNAL: "#777777",
}


async def record_one_email() -> tuple[list[ReadableSpan], str]:
    """Send one email through the API and the worker with tracing on: its trace's spans and
    the job's id."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.setup_tracing(SERVICE, tracer_provider=provider)
    redis: ArqRedis = await create_pool(RedisSettings.from_dsn(TEST_REDIS_URL))
    await redis.flushdb()
    smtp = await start_smtp_server(RecordingSmtpHandler())
    try:
        with tempfile.TemporaryDirectory() as folder:
            settings = Settings(
                _env_file=None,
                redis_url=TEST_REDIS_URL,
                api_keys=[API_KEY],
                smtp_host="127.0.0.1",
                smtp_port=server_port(smtp),
                mail_from="asyncjobs@example.com",
                exports_dir=Path(folder) / "exports",
            )
            worker, task = await start_worker(settings, cron_jobs=[])
            try:
                async with api_client(create_app(settings)) as api:
                    body = {"to": "ada@example.com", "subject": "Your invoice", "text": "Hello"}
                    response = await api.post("/jobs/email", json=body)
                    assert response.status == 202, await response.text()
                    job_id: str = (await response.json())["job_id"]
                    assert (await wait_job(api, job_id))["status"] == "complete"

                    async def processed() -> bool:
                        return any(
                            s.name.startswith("process") for s in exporter.get_finished_spans()
                        )

                    await wait_for(processed, what="the worker's span to end")
            finally:
                await stop_worker(worker, task)
    finally:
        smtp.close()
        await redis.flushdb()
        await redis.aclose()
        tracing.reset_tracing()
    spans = exporter.get_finished_spans()
    [server] = [s for s in spans if s.kind == SpanKind.SERVER and s.name.endswith("/jobs/email")]
    assert server.context is not None
    trace_id = server.context.trace_id  # the email's (the API's GET /jobs/{id} have their own)
    return [s for s in spans if s.context and s.context.trace_id == trace_id], job_id


def tree(spans: list[ReadableSpan]) -> Iterator[tuple[int, ReadableSpan]]:
    """The spans depth first, each parent's children by start time: (depth, span)."""
    ids = {s.context.span_id for s in spans if s.context}
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in spans:
        parent = span.parent.span_id if span.parent and span.parent.span_id in ids else None
        children.setdefault(parent, []).append(span)

    def walk(parent: int | None, depth: int) -> Iterator[tuple[int, ReadableSpan]]:
        for span in sorted(children.get(parent, []), key=lambda s: s.start_time or 0):
            yield depth, span
            if span.context:
                yield from walk(span.context.span_id, depth + 1)

    return walk(None, 0)


def row(depth: int, span: ReadableSpan, names: dict[int, str], t0: int, total: int) -> str:
    start, end = span.start_time or t0, span.end_time or t0
    left, width = (start - t0) / total * 100, max((end - start) / total * 100, 0.15)
    attributes = span.attributes or {}
    shown = [f"{k}={shorten(str(attributes[k]))}" for k in SHOWN if k in attributes]
    shown += [f"link → {names.get(link.context.span_id, '?')}" for link in span.links]
    kind = span.kind.name + (" · ERROR" if span.status.status_code == StatusCode.ERROR else "")
    # the duration right of its bar, or left of it where the bar ends near the axis's end
    place = f"left:{left + width:.3f}%" if left + width < 80 else f"right:{100 - left:.3f}%"
    return f"""<div class="row"><div class="name" style="padding-left:{depth * 18 + 6}px">
<b>{html.escape(span.name)}</b> <span class="kind">{kind}</span>
<div class="attrs">{"<br>".join(html.escape(a) for a in shown)}</div></div>
<div class="lane"><div class="bar" style="left:{left:.3f}%;width:{width:.3f}%;
background:{COLOURS[span.kind]}"></div><span class="ms" style="{place}">
{(end - start) / 1e6:.2f} ms</span></div></div>"""


def shorten(value: str, most: int = 44) -> str:
    """A redis span's sanitized statement (`EVALSHA ? ? ...`) runs to one `?` an argument;
    a pipeline's has one line a command."""
    value = value.replace("\n", "; ")
    return value if len(value) <= most else value[: most - 1] + "…"


def page(spans: list[ReadableSpan], job_id: str) -> str:
    """A waterfall of the trace: one row per span, on one time axis."""
    t0 = min(s.start_time or 0 for s in spans)
    total = max(s.end_time or 0 for s in spans) - t0
    names = {s.context.span_id: s.name for s in spans if s.context}
    trace_id = next(format(s.context.trace_id, "032x") for s in spans if s.context)
    ticks = "".join(
        f'<span style="left:{q * 25}%">{total * q / 4 / 1e6:.1f} ms</span>' for q in range(5)
    )
    legend = " ".join(
        f'<i style="background:{c}"></i>{k.name}'
        for k, c in COLOURS.items()
        if k != SpanKind.INTERNAL
    )
    rows = "".join(row(depth, span, names, t0, total) for depth, span in tree(spans))
    return f"""<!doctype html><meta charset="utf-8"><style>
body {{ font: 13px/1.35 system-ui, sans-serif; margin: 16px; color: #222; }}
h1 {{ font-size: 17px; margin: 0 0 4px; }} p {{ margin: 0 0 10px; color: #555; }}
.legend i {{ display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 12px; }}
.row, .axis {{ display: flex; border-bottom: 1px solid #e4e4e4; }}
.name {{ width: 46%; padding: 4px 6px; box-sizing: border-box; }}
.kind {{ font-size: 11px; color: #777; }}
.attrs {{ font: 11px/1.3 ui-monospace, monospace; color: #555; overflow-wrap: anywhere; }}
.lane {{ position: relative; flex: 1; margin-right: 60px; }}
.bar {{ position: absolute; top: 6px; height: 14px; border-radius: 2px; }}
.ms {{ position: absolute; top: 5px; padding: 0 6px; font-size: 11px; white-space: nowrap; }}
.axis .lane {{ height: 18px; font-size: 11px; color: #777; white-space: nowrap; }}
.axis .lane span {{ position: absolute; border-left: 1px solid #bbb; padding-left: 3px; }}
.axis .lane span:last-child {{ transform: translateX(-100%); border: 0;
  border-right: 1px solid #bbb; padding: 0 3px 0 0; }}
</style>
<h1>POST /jobs/email: one trace, {len(spans)} spans, {total / 1e6:.1f} ms</h1>
<p>trace {trace_id} · job {html.escape(job_id)} · service.name {SERVICE} (the API and the
worker in one process) · drawn by tests/tracepicture.py from the spans the OpenTelemetry SDK
recorded (its in-memory exporter), not Jaeger's UI<span class="legend">{legend}</span></p>
<div class="axis"><div class="name"></div><div class="lane">{ticks}</div></div>
{rows}
<p style="margin-top:8px">The first row is the caller: this script's aiohttp client, instrumented
too; the API took its traceparent, so the request's span is its child.</p>"""


async def shoot(html_page: str, path: Path) -> None:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        context = await browser.new_context(viewport={"width": 1200, "height": 400})
        browser_page = await context.new_page()
        await browser_page.set_content(html_page)
        save(await browser_page.screenshot(full_page=True), path)
        await browser.close()


async def main() -> None:
    spans, job_id = await record_one_email()
    await shoot(page(spans, job_id), OUT / "email-trace.png")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
