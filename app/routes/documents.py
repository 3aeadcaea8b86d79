"""Documents API: what the scrapers saved, filtered by source and change time, with versions."""

from __future__ import annotations

from datetime import datetime

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from app.http import json_model, query_int
from app.schemas import DocumentDetail, DocumentList
from app.state import REDIS
from asyncjobs.keys import DOC_CHANGED_KEY, DOC_KEY_PREFIX, HEX_ID_PATTERN, source_docs_key
from jobs.scrape.documents import load_document, load_versions, parse_document
from jobs.values import as_text


class DocumentQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(None, pattern=f"^{HEX_ID_PATTERN}$")
    changed_since: datetime | None = None


async def index(request: web.Request) -> web.Response:
    query = DocumentQuery.model_validate(
        {k: v for k, v in request.query.items() if k not in ("offset", "limit")}
    )
    offset = query_int(request, "offset", default=0, lo=0, hi=10_000_000)
    limit = query_int(request, "limit", default=50, lo=1, hi=500)
    redis = request.app[REDIS]
    since = query.changed_since.timestamp() if query.changed_since else "-inf"
    if query.source is None:
        total = await redis.zcount(DOC_CHANGED_KEY, since, "+inf")
        ids = await redis.zrevrangebyscore(DOC_CHANGED_KEY, "+inf", since, start=offset, num=limit)
    else:  # a source's set, ordered by change time through the index
        members = await redis.smembers(source_docs_key(query.source))  # type: ignore[misc]
        async with redis.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.zscore(DOC_CHANGED_KEY, member)
            scores = await pipe.execute()
        floor = float(since)
        ranked = sorted(
            ((s, m) for s, m in zip(scores, members, strict=True) if s is not None and s >= floor),
            reverse=True,
        )
        total = len(ranked)
        ids = [m for _, m in ranked[offset : offset + limit]]
    async with redis.pipeline(transaction=False) as pipe:
        for doc_id in ids:
            pipe.hgetall(DOC_KEY_PREFIX + as_text(doc_id))
        raws = await pipe.execute()
    items = [parse_document(as_text(i), raw) for i, raw in zip(ids, raws, strict=True)]
    # the text and metadata (JSON-LD: up to 64 KiB) only in GET /documents/{id}
    documents = [d.model_copy(update={"text": "", "metadata": {}}) for d in items if d is not None]
    return json_model(DocumentList(total=total, offset=offset, limit=limit, items=documents))


async def show(request: web.Request) -> web.Response:
    redis = request.app[REDIS]
    doc_id = request.match_info["doc_id"]
    document = await load_document(redis, doc_id)
    if document is None:
        raise web.HTTPNotFound(text="no such document")
    versions = await load_versions(redis, doc_id)
    return json_model(DocumentDetail(document=document, versions=versions))


def add_document_routes(app: web.Application) -> None:
    app.router.add_get("/documents", index)
    app.router.add_get(f"/documents/{{doc_id:{HEX_ID_PATTERN}}}", show)
