"""Report API: ask for a fresh analysis report (a job), and read the last one built."""

from __future__ import annotations

from aiohttp import web

from app.http import enqueue, json_model, status_url
from app.idempotency import idempotent
from app.schemas import JobAccepted
from app.state import REDIS
from jobs.housekeeping.report import latest_report


@idempotent
async def enqueue_report(request: web.Request) -> web.Response:
    """Building a report scans every document: a worker does it, the caller polls the job."""
    job_id = await enqueue(request, "report")
    accepted = JobAccepted(job_id=job_id, status_url=status_url(request, job_id))
    return json_model(accepted, status=202)


async def show_latest_report(request: web.Request) -> web.Response:
    report = await latest_report(request.app[REDIS])
    if report is None:
        raise web.HTTPNotFound(text="no report yet: POST /jobs/report")
    return web.json_response(report)


def add_report_routes(app: web.Application) -> None:
    app.router.add_post("/jobs/report", enqueue_report)
    app.router.add_get("/reports/latest", show_latest_report)
