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
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from redis.asyncio import Redis

from jobs.values import as_text

DOC_KEY_PREFIX = "asyncjobs:doc:"
DOC_INDEX_KEY = "asyncjobs:docs"
DOC_CHANGED_KEY = "asyncjobs:docs:changed"


class DocumentSnapshot(BaseModel):
    url: str
    final_url: str
    status: int
    content_type: str
    title: str | None = None  # None fields are not stored in the hash
    description: str | None = None
    links_count: int
    text_length: int
    text: str
    content_hash: str
    extracted: dict[str, list[str]] = {}
    fetched_at: datetime
    fetch_ms: float
    source_id: str | None = None
    etag: str | None = None
    last_modified: str | None = None


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


def versions_key(doc_id: str) -> str:
    return f"{DOC_KEY_PREFIX}{doc_id}:versions"


def source_docs_key(source_id: str) -> str:
    return f"asyncjobs:source:{source_id}:docs"


async def save_document(redis: Redis, snapshot: DocumentSnapshot, keep_versions: int = 5) -> bool:
    """Store a fetch of `snapshot.url`; True when its content changed (a new version)."""
    doc_id = document_id(snapshot.url)
    key = DOC_KEY_PREFIX + doc_id
    previous_hash = await redis.hget(key, "content_hash")  # type: ignore[misc]
    if previous_hash is not None and as_text(previous_hash) == snapshot.content_hash:
        await record_unchanged(
            redis, snapshot.url, snapshot.fetched_at, snapshot.fetch_ms,
            etag=snapshot.etag, last_modified=snapshot.last_modified,
        )  # fmt: skip
        return False
    fields: dict[str, Any] = snapshot.model_dump(mode="json")
    fields["extracted"] = json.dumps(fields["extracted"])
    fields["changed_at"] = fields["fetched_at"]
    version = DocumentVersion(
        content_hash=snapshot.content_hash,
        fetched_at=snapshot.fetched_at,
        title=snapshot.title,
        text_length=snapshot.text_length,
        text=snapshot.text,
    )
    when = snapshot.fetched_at.timestamp()
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(key)
        pipe.hset(key, mapping={k: str(v) for k, v in fields.items() if v is not None})
        pipe.lpush(versions_key(doc_id), version.model_dump_json())
        pipe.ltrim(versions_key(doc_id), 0, keep_versions - 1)
        pipe.zadd(DOC_INDEX_KEY, {doc_id: when})
        pipe.zadd(DOC_CHANGED_KEY, {doc_id: when})
        if snapshot.source_id:
            pipe.sadd(source_docs_key(snapshot.source_id), doc_id)
        await pipe.execute()
    return True


async def record_unchanged(
    redis: Redis,
    url: str,
    fetched_at: datetime,
    fetch_ms: float,
    *,
    etag: str | None = None,
    last_modified: str | None = None,
) -> None:
    """A fetch that found the same content (or a 304): refresh the check time, no new version."""
    doc_id = document_id(url)
    fields: dict[str, str] = {"fetched_at": fetched_at.isoformat(), "fetch_ms": str(fetch_ms)}
    if etag:
        fields["etag"] = etag
    if last_modified:
        fields["last_modified"] = last_modified
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hset(DOC_KEY_PREFIX + doc_id, mapping=fields)
        pipe.zadd(DOC_INDEX_KEY, {doc_id: fetched_at.timestamp()})
        await pipe.execute()


async def load_document(redis: Redis, doc_id: str) -> StoredDocument | None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(DOC_KEY_PREFIX + doc_id)
        pipe.llen(versions_key(doc_id))
        raw, versions = await pipe.execute()
    return parse_document(doc_id, raw, versions)


def parse_document(doc_id: str, raw: dict[Any, Any], versions: int = 1) -> StoredDocument | None:
    if not raw:
        return None
    fields: dict[str, Any] = {as_text(k): as_text(v) for k, v in raw.items()}
    fields["extracted"] = json.loads(fields.get("extracted", "{}"))
    return StoredDocument.model_validate(fields | {"id": doc_id, "versions": versions})


async def load_versions(redis: Redis, doc_id: str) -> list[DocumentVersion]:
    raws = await redis.lrange(versions_key(doc_id), 0, -1)  # type: ignore[misc]
    return [DocumentVersion.model_validate_json(raw) for raw in raws]


async def previous_validators(redis: Redis, url: str) -> tuple[str | None, str | None]:
    """(ETag, Last-Modified) of the stored snapshot, for a conditional request."""
    etag, last_modified = await redis.hmget(  # type: ignore[misc]
        DOC_KEY_PREFIX + document_id(url), ["etag", "last_modified"]
    )
    return (as_text(etag) if etag else None, as_text(last_modified) if last_modified else None)


def now_utc() -> datetime:
    return datetime.now(UTC)
