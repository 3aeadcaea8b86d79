"""The HTTP API, one module per resource; `add_routes` mounts them all."""

from __future__ import annotations

from aiohttp import web

from app.metrics import add_metrics
from app.routes.batches import add_batch_routes
from app.routes.dead_letters import add_dead_letter_routes
from app.routes.documents import add_document_routes
from app.routes.exports import add_export_routes
from app.routes.httpjobs import add_http_job_routes
from app.routes.images import add_image_routes
from app.routes.jobs import add_job_routes
from app.routes.registered import add_registered_routes
from app.routes.reports import add_report_routes
from app.routes.schedules import add_schedule_routes
from app.routes.sources import add_source_routes
from app.routes.system import add_system_routes
from asyncjobs.settings import Settings


def add_routes(app: web.Application, settings: Settings) -> None:
    add_registered_routes(app)  # before /jobs/{job_id}: /jobs/types is no job
    add_job_routes(app)
    add_http_job_routes(app)
    add_batch_routes(app)
    add_dead_letter_routes(app)
    add_source_routes(app)
    add_schedule_routes(app)
    add_document_routes(app)
    add_export_routes(app)
    add_image_routes(app)
    add_report_routes(app)
    add_system_routes(app, settings)
    add_metrics(app)
