"""Report API: ask for a fresh analysis report (a job), and read the last one built."""

from __future__ import annotations

import jinja2
from aiohttp import web

from app.http import enqueue, json_model, read_json_object, status_url
from app.idempotency import idempotent
from app.joboptions import split_options
from app.schemas import JobAccepted
from app.state import REDIS, SETTINGS
from jobs.engine.unique import is_existing
from jobs.housekeeping.report import latest_report


@idempotent
async def enqueue_report(request: web.Request) -> web.Response:
    """Building a report scans every document: a worker does it, the caller polls the job.
    The body is optional: only the job options (run_at, delay_seconds, priority, callback_url)."""
    body = await read_json_object(request) if request.body_exists else {}
    options, rest = split_options(body, request.app[SETTINGS])
    if rest:
        raise web.HTTPUnprocessableEntity(
            text=f"unknown fields {sorted(rest)}: a report takes only the job options"
        )
    job_id = await enqueue(request, "report", **options.enqueue_kwargs())
    accepted = JobAccepted(
        job_id=job_id, status_url=status_url(request, job_id), existing=is_existing(job_id)
    )
    return json_model(accepted, status=202)


async def show_latest_report(request: web.Request) -> web.Response:
    report = await latest_report(request.app[REDIS])
    if report is None:
        raise web.HTTPNotFound(text="no report yet: POST /jobs/report")
    return web.json_response(report)


# Report values come from scraped titles: autoescaped, like every page this project renders.
_TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("app", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)


async def show_latest_report_html(request: web.Request) -> web.Response:
    """The same report as a page a person can read (and print to PDF from a browser)."""
    report = await latest_report(request.app[REDIS])
    if report is None:
        raise web.HTTPNotFound(text="no report yet: POST /jobs/report")
    html = _TEMPLATES.get_template("report.html").render(report=report)
    return web.Response(text=html, content_type="text/html", charset="utf-8")


def add_report_routes(app: web.Application) -> None:
    app.router.add_post("/jobs/report", enqueue_report)
    app.router.add_get("/reports/latest", show_latest_report)
    app.router.add_get("/reports/latest.html", show_latest_report_html)
