"""Sources API: create, list, show, change and delete scheduled scraping sources; run one now
and list its runs."""

from __future__ import annotations

from aiohttp import web

from app.http import found, json_model, owner_of, read_json_object, status_url
from app.schemas import SourceList, SourceRunAccepted, SourceRunList, SourceRunRequest
from app.state import REDIS, SETTINGS
from asyncjobs.keys import HEX_ID_PATTERN
from jobs.scrape.runs import RunInProgress, load_runs, run_now
from jobs.scrape.sources import (
    Source,
    SourceFields,
    SourceSpec,
    create_source,
    delete_source,
    get_source,
    list_sources,
    update_source,
)

SOURCE_ID_PATTERN = HEX_ID_PATTERN


async def create(request: web.Request) -> web.Response:
    spec = SourceSpec.model_validate(await read_json_object(request), context=_context(request))
    source = await create_source(request.app[REDIS], spec)
    response = json_model(source, status=201)
    response.headers["Location"] = f"/sources/{source.id}"
    return response


async def index(request: web.Request) -> web.Response:
    return json_model(SourceList(sources=await list_sources(request.app[REDIS])))


async def show(request: web.Request) -> web.Response:
    return json_model(await _existing(request))


async def change(request: web.Request) -> web.Response:
    changes = SourceFields.model_validate(
        await read_json_object(request), context=_context(request)
    )
    source = await update_source(request.app[REDIS], await _existing(request), changes)
    return json_model(source)


def _context(request: web.Request) -> dict[str, object]:
    return {"max_pages": request.app[SETTINGS].source_max_pages}


async def remove(request: web.Request) -> web.Response:
    if not await delete_source(request.app[REDIS], request.match_info["source_id"]):
        raise web.HTTPNotFound(text="no such source")
    return web.Response(status=204)


async def _existing(request: web.Request) -> Source:
    return found(await get_source(request.app[REDIS], request.match_info["source_id"]), "source")


async def run(request: web.Request) -> web.Response:
    """Start a run now: 202 with its id; 409 while another run of the source is in progress."""
    source = await _existing(request)
    body = await read_json_object(request) if request.body_exists else {}
    options = SourceRunRequest.model_validate(body)
    try:
        run_id, job_id = await run_now(
            request.app[REDIS], request.app[SETTINGS], source.id, options.force,
            owner=owner_of(request) or None,
        )  # fmt: skip
    except RunInProgress as exc:
        raise web.HTTPConflict(text=f"{exc}: GET {_runs_url(request, source.id)}") from None
    accepted = SourceRunAccepted(
        run_id=run_id, job_id=job_id, status_url=status_url(request, job_id),
        runs_url=_runs_url(request, source.id),
    )  # fmt: skip
    return json_model(accepted, status=202)


async def runs(request: web.Request) -> web.Response:
    """The source's last runs, newest first, each with its pages' outcomes."""
    source = await _existing(request)
    return json_model(SourceRunList(runs=await load_runs(request.app[REDIS], source.id)))


def _runs_url(request: web.Request, source_id: str) -> str:
    return str(request.app.router["source_runs"].url_for(source_id=source_id))


def add_source_routes(app: web.Application) -> None:
    one = f"/sources/{{source_id:{SOURCE_ID_PATTERN}}}"
    app.router.add_post("/sources", create)
    app.router.add_get("/sources", index)
    app.router.add_get(one, show)
    app.router.add_patch(one, change)
    app.router.add_delete(one, remove)
    app.router.add_post(f"{one}/run", run)
    app.router.add_get(f"{one}/runs", runs, name="source_runs")
