"""Analysis report: per-source page counts, change rates, fetch times and failures, top title words.

Built by a daily cron job or on demand (`POST /jobs/report`), and kept as JSON at REPORT_KEY so
`GET /reports/latest` answers without scanning anything. One pass over the document index, in
ZSCAN chunks with pipelined HMGETs, reads only four small fields per document (never its text).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from redis.asyncio import Redis

from asyncjobs.keys import (
    DOC_INDEX_KEY,
    DOC_KEY_PREFIX,
    REPORT_KEY,
    SCRAPE_FAILURES_KEY,
    SOURCES_KEY,
    source_failures_key,
)
from jobs.context import WorkerContext
from jobs.retry import builtin
from jobs.values import as_text, as_utc, now_utc

AD_HOC = "ad-hoc"  # the bucket of documents scraped without a source
CHUNK = 500  # documents per ZSCAN step and pipeline
TOP_WORDS = 20
WORD = re.compile(r"[^\W\d_]{4,}")  # a run of 4+ letters (any script), digits and _ excluded
FIELDS = ["source_id", "changed_at", "fetch_ms", "title"]


@dataclass
class _Bucket:
    """Running totals of one source (or of the ad-hoc documents)."""

    pages: int = 0
    changed_last_day: int = 0
    changed_last_week: int = 0
    fetch_ms_total: float = 0.0
    fetch_ms_count: int = 0

    def add(self, changed_at: datetime | None, fetch_ms: float | None, now: datetime) -> None:
        self.pages += 1
        if changed_at is not None and changed_at >= now - timedelta(days=1):
            self.changed_last_day += 1
        if changed_at is not None and changed_at >= now - timedelta(days=7):
            self.changed_last_week += 1
        if fetch_ms is not None:
            self.fetch_ms_total += fetch_ms
            self.fetch_ms_count += 1

    def summary(self, failures: dict[str, int]) -> dict[str, Any]:
        average = self.fetch_ms_total / self.fetch_ms_count if self.fetch_ms_count else None
        return {
            "pages": self.pages,
            "changed_last_day": self.changed_last_day,
            "changed_last_week": self.changed_last_week,
            "avg_fetch_ms": round(average, 1) if average is not None else None,
            "failures": failures,
        }


async def build_report(redis: Redis, now: datetime) -> dict[str, Any]:
    """Compute the report as of `now`, store it at REPORT_KEY, and return it.

    `documents` counts every indexed document; those of deleted sources (not yet removed by the
    cleanup) are in no bucket and counted in `orphaned_documents`, so the numbers add up.
    """
    now = as_utc(now)
    source_ids = sorted({as_text(s) async for s in redis.sscan_iter(SOURCES_KEY, count=CHUNK)})
    buckets = {sid: _Bucket() for sid in source_ids}
    ad_hoc = _Bucket()
    words: Counter[str] = Counter()
    documents = orphaned = 0
    seen: set[str] = set()  # ZSCAN may return an id twice while the index grows
    cursor = 0
    while True:
        cursor, entries = await redis.zscan(DOC_INDEX_KEY, cursor, count=CHUNK)
        doc_ids = [i for i in (as_text(m) for m, _ in entries) if i not in seen]
        seen.update(doc_ids)
        async with redis.pipeline(transaction=False) as pipe:
            for doc_id in doc_ids:
                pipe.hmget(DOC_KEY_PREFIX + doc_id, FIELDS)
            rows = await pipe.execute() if doc_ids else []
        for source_id, changed_at, fetch_ms, title in rows:
            if source_id is None and changed_at is None and fetch_ms is None and title is None:
                continue  # deleted after ZSCAN saw it
            documents += 1
            if title is not None:
                words.update(w.lower() for w in WORD.findall(as_text(title)))
            if source_id is None:
                bucket: _Bucket | None = ad_hoc
            else:
                bucket = buckets.get(as_text(source_id))
            if bucket is None:
                orphaned += 1
                continue
            bucket.add(_time(changed_at), _float(fetch_ms), now)
        if cursor == 0:
            break

    failures = await _failures(redis, source_ids)
    sources = {sid: buckets[sid].summary(failures[sid]) for sid in source_ids}
    sources[AD_HOC] = ad_hoc.summary(failures[AD_HOC])
    ranked = sorted(words.items(), key=lambda item: (-item[1], item[0]))[:TOP_WORDS]
    report: dict[str, Any] = {
        "generated_at": now.isoformat(),
        "documents": documents,
        "orphaned_documents": orphaned,
        "sources": sources,
        "top_words": [[word, count] for word, count in ranked],
    }
    await redis.set(REPORT_KEY, json.dumps(report))
    return report


async def latest_report(redis: Redis) -> dict[str, Any] | None:
    """The last report built, or None before the first one."""
    raw = await redis.get(REPORT_KEY)
    if raw is None:
        return None
    report: dict[str, Any] = json.loads(raw)
    return report


@builtin("daily_report", "maintenance")  # a cron job
async def daily_report(ctx: WorkerContext) -> dict[str, Any]:
    """Cron job: a fresh report every day, so `GET /reports/latest` is never more than a day old."""
    return await build_report(ctx.redis, now_utc())


@builtin("report", "maintenance", endpoint="report", schedulable=True)
async def report(ctx: WorkerContext) -> dict[str, Any]:
    """On-demand job behind `POST /jobs/report`."""
    return await build_report(ctx.redis, now_utc())


async def _failures(redis: Redis, source_ids: list[str]) -> dict[str, dict[str, int]]:
    """Each source's failures hash as {reason: count}, and the scrapes' of no source (AD_HOC),
    in one pipeline. Scrapes count there once each, when they fail for good, by the typed
    reason their error carries (jobs.scrape.errors.FailureReason)."""
    keys = {sid: source_failures_key(sid) for sid in source_ids} | {AD_HOC: SCRAPE_FAILURES_KEY}
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys.values():
            pipe.hgetall(key)
        hashes = await pipe.execute()
    return {
        sid: {as_text(reason): int(count) for reason, count in sorted(raw.items())}
        for sid, raw in zip(keys, hashes, strict=True)
    }


def _time(value: bytes | str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return as_utc(datetime.fromisoformat(as_text(value)))
    except ValueError:
        return None


def _float(value: bytes | str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None
