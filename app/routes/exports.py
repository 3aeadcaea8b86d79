"""Document exports: enqueue an `export` job, then download the file it wrote."""

from __future__ import annotations

import asyncio

from aiohttp import web

from app.http import enqueue, json_model, status_url
from app.idempotency import idempotent, new_job_id
from app.joboptions import read_job_request
from app.schemas import JobAccepted
from app.state import SETTINGS
from jobs.engine.unique import is_existing
from jobs.housekeeping.export import CONTENT_TYPES, EXPORT_NAME_PATTERN, ExportRequest, export_name


class ExportAccepted(JobAccepted):
    download_url: str


@idempotent
async def enqueue_export(request: web.Request) -> web.Response:
    options, body = await read_job_request(request)
    spec = ExportRequest.model_validate(body)
    export_id = new_job_id(request)
    job_id = await enqueue(
        request,
        "export",
        export_id=export_id,
        request=spec.model_dump(mode="json"),
        _job_id=export_id,
        **options.enqueue_kwargs(),
    )
    name = export_name(job_id, spec.format)  # an export job's id is its export's
    accepted = ExportAccepted(
        job_id=job_id,
        status_url=status_url(request, job_id),
        download_url=str(request.app.router["export_download"].url_for(name=name)),
        existing=is_existing(job_id),
    )
    return json_model(accepted, status=202)


async def download_export(request: web.Request) -> web.StreamResponse:
    """The finished file; 404 until the job has renamed it into place (or after it expired)."""
    name = request.match_info["name"]  # the route pattern allows no path separators
    path = request.app[SETTINGS].exports_dir / name
    if not await asyncio.to_thread(path.is_file):
        raise web.HTTPNotFound(text=f"no export {name}: not finished, expired or never requested")
    extension = name.rpartition(".")[2]
    headers = {
        "Content-Type": CONTENT_TYPES[extension],
        "Content-Disposition": f'attachment; filename="{name}"',
    }
    return web.FileResponse(path, headers=headers)


def add_export_routes(app: web.Application) -> None:
    app.router.add_post("/jobs/export", enqueue_export)
    app.router.add_get(
        f"/exports/{{name:{EXPORT_NAME_PATTERN}}}", download_export, name="export_download"
    )
