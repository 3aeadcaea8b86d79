"""Scraped documents kept in Redis beyond arq's result TTL: one hash per URL, plus a time index."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from redis.asyncio import Redis

DOC_KEY_PREFIX = "asyncjobs:doc:"
DOC_INDEX_KEY = "asyncjobs:docs"  # zset: document id -> last fetch time (unix seconds)


class DocumentSnapshot(BaseModel):
    url: str
    final_url: str
    status: int
    content_type: str
    title: str | None
    description: str | None
    links_count: int
    text_length: int
    text: str
    content_hash: str
    extracted: dict[str, list[str]] = {}
    fetched_at: datetime
    fetch_ms: float


def document_id(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:32]


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def save_document(redis: Redis, snapshot: DocumentSnapshot) -> str:
    """Replace the latest snapshot of this URL and index it by fetch time, atomically."""
    doc_id = document_id(snapshot.url)
    fields: dict[str, Any] = snapshot.model_dump(mode="json")
    fields["extracted"] = json.dumps(fields["extracted"])
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(DOC_KEY_PREFIX + doc_id)
        pipe.hset(
            DOC_KEY_PREFIX + doc_id, mapping={k: str(v) for k, v in fields.items() if v is not None}
        )
        pipe.zadd(DOC_INDEX_KEY, {doc_id: snapshot.fetched_at.timestamp()})
        await pipe.execute()
    return doc_id


async def load_document(redis: Redis, doc_id: str) -> DocumentSnapshot | None:
    raw: dict[bytes, bytes] = await redis.hgetall(DOC_KEY_PREFIX + doc_id)  # type: ignore[misc]
    if not raw:
        return None
    fields = {_text(k): _text(v) for k, v in raw.items()}
    fields["extracted"] = json.loads(fields.get("extracted", "{}"))
    return DocumentSnapshot.model_validate(fields)


def now_utc() -> datetime:
    return datetime.now(UTC)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
