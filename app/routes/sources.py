"""Sources API: create, list, show, change and delete scheduled scraping sources."""

from __future__ import annotations

from aiohttp import web

from app.http import found, json_model, read_json_object
from app.schemas import SourceList
from app.state import REDIS, SETTINGS
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

SOURCE_ID_PATTERN = r"[0-9a-f]{32}"


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


def add_source_routes(app: web.Application) -> None:
    one = f"/sources/{{source_id:{SOURCE_ID_PATTERN}}}"
    app.router.add_post("/sources", create)
    app.router.add_get("/sources", index)
    app.router.add_get(one, show)
    app.router.add_patch(one, change)
    app.router.add_delete(one, remove)
