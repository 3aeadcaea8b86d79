"""Scraped documents kept in Redis beyond arq's result TTL, with change detection and versions.

Keys (doc id = sha256(url)[:32]):
- `asyncjobs:doc:<id>`            hash: the latest snapshot of the URL
- `asyncjobs:doc:<id>:versions`   list, newest first: the last K distinct contents (JSON)
- `asyncjobs:docs`                zset: doc id -> last fetch time (unix seconds)
- `asyncjobs:docs:changed`        zset: doc id -> time its content last changed
- `asyncjobs:source:<sid>:docs`   set: the documents a source produced
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from redis.asyncio import Redis

from asyncjobs.keys import (
    DOC_CHANGED_KEY,
    DOC_INDEX_KEY,
    DOC_KEY_PREFIX,
    doc_versions_key,
    source_docs_key,
)
from asyncjobs.luascript import LuaScript
from asyncjobs.speedups import dumps
from jobs.scrape.html import Extracted
from jobs.values import as_text

MAX_STORED_LINKS = 500  # links kept per document, for following them after a 304
# What a fetch derives from the page beside its text: rewritten by every fetch, changed or not
REFRESHED = ("extracted", "selectors_digest", "metadata", "links", "links_base")


class DocumentSnapshot(BaseModel):
    url: str
    final_url: str
    status: int
    content_type: str
    encoding: str | None = None  # the codec the page was read with (jobs/scrape/encoding.py)
    title: str | None = None  # None fields are not stored in the hash
    description: str | None = None
    links_count: int
    text_length: int
    text: str
    content_hash: str
    extracted: dict[str, Extracted] = {}
    # canonical, og, json_ld (jobs.scrape.html.page_metadata)
    metadata: dict[str, Any] = {}
    fetched_at: datetime
    fetch_ms: float
    source_id: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    selectors_digest: str | None = None  # what `extracted` was made with (jobs.scrape.selectors)


class StoredDocument(DocumentSnapshot):
    id: str
    changed_at: datetime
    versions: int = 1


class DocumentVersion(BaseModel):
    content_hash: str
    fetched_at: datetime
    title: str | None
    text_length: int
    text: str


def document_id(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:32]


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


_SAVE = LuaScript("jobs.scrape", "documents_save")


async def save_document(
    redis: Redis,
    snapshot: DocumentSnapshot,
    keep_versions: int = 5,
    links: list[str] | None = None,
    links_base: str = "",
) -> bool:
    """Store a fetch of `snapshot.url`; True when its content changed (a new version).
    One script: the comparison with the stored content and the write cannot interleave with
    another worker's save of the same URL, and it is one round trip. The page's `links` (as
    written, relative to `links_base`: shorter than absolute) are kept with it, so a later 304
    (not modified) can still follow them."""
    fields: dict[str, Any] = snapshot.model_dump(mode="json")
    fields["extracted"] = dumps(fields["extracted"])
    fields["metadata"] = dumps(fields["metadata"])
    fields["selectors_digest"] = fields["selectors_digest"] or ""  # none: stored as none
    fields["changed_at"] = fields["fetched_at"]
    if links is not None:
        fields["links"] = dumps(links[:MAX_STORED_LINKS])
        fields["links_base"] = links_base
    version = DocumentVersion(
        content_hash=snapshot.content_hash,
        fetched_at=snapshot.fetched_at,
        title=snapshot.title,
        text_length=snapshot.text_length,
        text=snapshot.text,
    )
    return await _save(redis, snapshot, fields, version, keep_versions)


async def _save(
    redis: Redis,
    snapshot: DocumentSnapshot,
    fields: dict[str, Any],
    version: DocumentVersion,
    keep_versions: int,
) -> bool:
    """lua/documents_save.lua: store the fetch, its hash `fields` (None: not stored) and, when
    the content changed, `version`; True when it changed."""
    doc_id = document_id(snapshot.url)
    keys = [DOC_KEY_PREFIX + doc_id, doc_versions_key(doc_id), DOC_INDEX_KEY, DOC_CHANGED_KEY]
    if snapshot.source_id:
        keys.append(source_docs_key(snapshot.source_id))
    args: list[str | int | float] = [
        snapshot.content_hash,
        fields["fetched_at"],
        str(snapshot.fetch_ms),
        snapshot.etag or "",
        snapshot.last_modified or "",
        snapshot.fetched_at.timestamp(),
        doc_id,
        version.model_dump_json(),
        keep_versions,
        snapshot.source_id or "",
    ]
    refreshed = [item for name in REFRESHED if name in fields for item in (name, str(fields[name]))]
    args += [len(refreshed), *refreshed]
    for name, value in fields.items():
        if value is not None:
            args += [name, str(value)]
    return bool(await _SAVE.run(redis, keys, args))


async def record_unchanged(
    redis: Redis,
    url: str,
    fetched_at: datetime,
    fetch_ms: float,
    *,
    etag: str | None = None,
    last_modified: str | None = None,
    source_id: str | None = None,
) -> None:
    """A fetch that found the same content (or a 304): refresh the check time, no new version;
    fetched for a source, the page belongs to it (see lua/documents_save.lua)."""
    doc_id = document_id(url)
    fields: dict[str, str] = {"fetched_at": fetched_at.isoformat(), "fetch_ms": str(fetch_ms)}
    if etag:
        fields["etag"] = etag
    if last_modified:
        fields["last_modified"] = last_modified
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(DOC_KEY_PREFIX + doc_id, mapping=fields)
        pipe.zadd(DOC_INDEX_KEY, {doc_id: fetched_at.timestamp()})
        if source_id:
            pipe.hsetnx(DOC_KEY_PREFIX + doc_id, "source_id", source_id)
            pipe.sadd(source_docs_key(source_id), doc_id)
        await pipe.execute()


async def load_document(redis: Redis, doc_id: str) -> StoredDocument | None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(DOC_KEY_PREFIX + doc_id)
        pipe.llen(doc_versions_key(doc_id))
        raw, versions = await pipe.execute()
    return parse_document(doc_id, raw, versions)


def parse_document(doc_id: str, raw: dict[Any, Any], versions: int = 1) -> StoredDocument | None:
    if not raw:
        return None
    fields: dict[str, Any] = {as_text(k): as_text(v) for k, v in raw.items()}
    for name in JSON_FIELDS:
        fields[name] = json.loads(fields.get(name) or "{}")
    return StoredDocument.model_validate(fields | {"id": doc_id, "versions": versions})


JSON_FIELDS = ("extracted", "metadata")


async def load_versions(redis: Redis, doc_id: str) -> list[DocumentVersion]:
    raws = await redis.lrange(doc_versions_key(doc_id), 0, -1)  # type: ignore[misc]
    return [DocumentVersion.model_validate_json(raw) for raw in raws]


# What a 304 (not modified) answers with: the stored snapshot's summary, never its text
STORED_SUMMARY = ("final_url", "encoding", "title", "description", "links_count",
                  "text_length", "content_hash", "extracted", "metadata", "links",
                  "links_base")  # fmt: skip


async def stored_summary(redis: Redis, url: str) -> dict[str, Any]:
    """The summary fields of the stored snapshot of `url`, JSON ones parsed ({} before the
    first save); `links` as written in the page, relative to `links_base`."""
    values = await redis.hmget(DOC_KEY_PREFIX + document_id(url), list(STORED_SUMMARY))  # type: ignore[misc]
    found: dict[str, Any] = {
        n: as_text(v) if v is not None else None
        for n, v in zip(STORED_SUMMARY, values, strict=True)
    }
    for name, empty in (("extracted", "{}"), ("metadata", "{}"), ("links", "[]")):
        found[name] = json.loads(found[name] or empty)
    for name in ("links_count", "text_length"):
        found[name] = int(found[name] or 0)
    return found


@dataclass(frozen=True)
class PreviousFetch:
    """What a new fetch of a URL needs of the last one: its validators, for a conditional
    request, and what its stored extraction was made with."""

    etag: str | None = None
    last_modified: str | None = None
    selectors_digest: str = ""


async def previous_fetch(redis: Redis, url: str) -> PreviousFetch:
    etag, last_modified, digest = await redis.hmget(  # type: ignore[misc]
        DOC_KEY_PREFIX + document_id(url), ["etag", "last_modified", "selectors_digest"]
    )
    return PreviousFetch(
        etag=as_text(etag) if etag else None,
        last_modified=as_text(last_modified) if last_modified else None,
        selectors_digest=as_text(digest) if digest else "",
    )
