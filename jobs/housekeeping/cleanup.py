"""Housekeeping: delete what nobody needs any more, so Redis and the exports folder stay bounded.

Four kinds of leftovers, each removed only once it is past its retention:
- document versions older than `version_retention` (a document's newest version always stays);
- export files older than `export_ttl` (only names the exporter writes, finished or not),
  and image jobs' folders as old;
- documents of deleted sources (their hash, versions, index entries and the source's doc set);
- dead letters that failed more than `dead_letter_retention` ago.

Documents are walked with ZSCAN in chunks and pipelines (never KEYS). Decisions that race with
scrapes (removing a version, deleting an orphan) are re-checked atomically in Lua on the server.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from asyncjobs.keys import (
    DEAD_INDEX_KEY,
    DEAD_KEY_PREFIX,
    DOC_CHANGED_KEY,
    DOC_INDEX_KEY,
    DOC_KEY_PREFIX,
    HEX_ID_PATTERN,
    SOURCES_KEY,
    doc_versions_key,
    source_docs_key,
)
from asyncjobs.luascript import LuaScript
from asyncjobs.settings import Settings
from jobs.context import WorkerContext
from jobs.housekeeping.export import EXPORT_NAME_PATTERN
from jobs.retry import builtin
from jobs.values import as_text, as_utc, now_utc

log = logging.getLogger(__name__)

CHUNK = 500  # documents per ZSCAN step and pipeline
EXPORT_NAME = re.compile(EXPORT_NAME_PATTERN)
IMAGE_JOB_FOLDER = re.compile(HEX_ID_PATTERN)
TEMP_NAME = re.compile(rf"{EXPORT_NAME_PATTERN}\.tmp")  # an export that never finished

# Decisions that race with scrapes, re-checked on the server (see lua/)
_VERSION_TIMES = LuaScript("jobs.housekeeping", "cleanup_version_times")
_DROP_VERSIONS = LuaScript("jobs.housekeeping", "cleanup_drop_versions")
_DELETE_ORPHAN = LuaScript("jobs.housekeeping", "cleanup_delete_orphan")


async def cleanup(redis: Redis, settings: Settings, now: datetime) -> dict[str, int]:
    """Remove everything past its retention at `now`; return how many of each kind went."""
    now = as_utc(now)
    docs = await _clean_documents(redis, now - timedelta(seconds=settings.version_retention))
    exports = await asyncio.to_thread(
        remove_expired_exports, settings.exports_dir, now.timestamp() - settings.export_ttl
    )
    images = await asyncio.to_thread(
        remove_expired_images, settings.images_dir, now.timestamp() - settings.export_ttl
    )
    dead = await _remove_old_dead_letters(redis, now.timestamp() - settings.dead_letter_retention)
    return {
        "versions": docs["versions"],
        "exports": exports,
        "images": images,
        "orphaned_documents": docs["orphaned_documents"],
        "dead_letters": dead,
    }


@builtin("daily_cleanup", "maintenance")  # a cron job
async def daily_cleanup(ctx: WorkerContext) -> dict[str, int]:
    """Cron job: the day's housekeeping, with its counts in the log and as the job result."""
    counts = await cleanup(ctx.redis, ctx.settings, now_utc())
    log.info(
        "cleanup removed %d versions, %d exports, %d image folders, %d orphaned documents, "
        "%d dead letters",
        counts["versions"],
        counts["exports"],
        counts["images"],
        counts["orphaned_documents"],
        counts["dead_letters"],
    )
    return counts


async def _clean_documents(redis: Redis, version_cutoff: datetime) -> dict[str, int]:
    """One pass over the document index: delete orphans, trim old versions of the others.

    ZSCAN tolerates deletions while it runs; an id it returns twice finds nothing left to do.
    """
    counts = {"versions": 0, "orphaned_documents": 0}
    cursor = 0
    while True:
        cursor, entries = await redis.zscan(DOC_INDEX_KEY, cursor, count=CHUNK)
        doc_ids = [as_text(member) for member, _ in entries]
        if doc_ids:
            async with redis.pipeline(transaction=False) as pipe:
                for doc_id in doc_ids:
                    pipe.hget(DOC_KEY_PREFIX + doc_id, "source_id")
                    await _queue_version_times(redis, pipe, doc_id)
                replies = await pipe.execute()
            source_ids = [as_text(s) if s else None for s in replies[0::2]]
            live = await _live_sources(redis, {s for s in source_ids if s})
            kinds: list[str] = []  # what each queued command does, to read its reply
            async with redis.pipeline(transaction=False) as pipe:
                for doc_id, sid, times in zip(doc_ids, source_ids, replies[1::2], strict=True):
                    if sid and sid not in live:
                        await _queue_delete_orphan(redis, pipe, doc_id, sid)
                        kinds.append("orphaned_documents")
                    elif expired := [as_text(t) for t in times if _older(t, version_cutoff)]:
                        await _queue_drop_versions(redis, pipe, doc_id, expired)
                        kinds.append("versions")
                removed = await pipe.execute() if kinds else []
            for kind, n in zip(kinds, removed, strict=True):
                counts[kind] += int(n)
        if cursor == 0:
            return counts


async def _queue_version_times(redis: Redis, pipe: Pipeline, doc_id: str) -> None:
    """Queue on `pipe` (of `redis`): the fetched_at of the document's versions but the newest."""
    await _VERSION_TIMES.run(redis, [doc_versions_key(doc_id)], [], pipe)


async def _queue_drop_versions(
    redis: Redis, pipe: Pipeline, doc_id: str, fetched_at: list[str]
) -> None:
    """Queue on `pipe`: remove the document's versions (never the newest) fetched at these
    times; its reply is how many went."""
    await _DROP_VERSIONS.run(redis, [doc_versions_key(doc_id)], fetched_at, pipe)


async def _queue_delete_orphan(redis: Redis, pipe: Pipeline, doc_id: str, source_id: str) -> None:
    """Queue on `pipe`: delete the document if it still belongs to `source_id` and that source
    is still gone; its reply is 1 if it went."""
    keys = [
        DOC_KEY_PREFIX + doc_id,
        doc_versions_key(doc_id),
        DOC_INDEX_KEY,
        DOC_CHANGED_KEY,
        SOURCES_KEY,
        source_docs_key(source_id),
    ]
    await _DELETE_ORPHAN.run(redis, keys, [doc_id, source_id], pipe)


async def _live_sources(redis: Redis, source_ids: set[str]) -> set[str]:
    """Which of these source ids still exist (one SMISMEMBER for a whole chunk)."""
    if not source_ids:
        return set()
    ordered = sorted(source_ids)
    flags = await redis.smismember(SOURCES_KEY, ordered)  # type: ignore[misc]
    return {sid for sid, flag in zip(ordered, flags, strict=True) if flag}


def remove_expired_exports(folder: Path, cutoff: float) -> int:
    """Delete export files (and stale temp files) last modified before `cutoff` (unix time).

    Anything else in the folder is not ours and stays. Blocking: run it in a thread.
    """

    def ours(entry: os.DirEntry[str]) -> bool:
        name = entry.name
        is_export = EXPORT_NAME.fullmatch(name) or TEMP_NAME.fullmatch(name)
        return bool(is_export) and entry.is_file(follow_symlinks=False)

    return _remove_old_entries(folder, cutoff, ours, os.unlink)


async def _remove_old_dead_letters(redis: Redis, cutoff: float) -> int:
    """Drop dead letters that failed before `cutoff` (unix time), a chunk at a time."""
    removed = 0
    while True:
        ids = await redis.zrangebyscore(DEAD_INDEX_KEY, "-inf", f"({cutoff!r}", start=0, num=CHUNK)
        if not ids:
            return removed
        async with redis.pipeline(transaction=False) as pipe:
            for entry_id in ids:
                pipe.delete(DEAD_KEY_PREFIX + as_text(entry_id))
                pipe.zrem(DEAD_INDEX_KEY, entry_id)
            replies = await pipe.execute()
        removed += sum(replies[1::2])  # ZREM's count: a concurrent cleanup's ids are not ours


def _older(fetched_at: bytes | str, cutoff: datetime) -> bool:
    """True when this version time is before `cutoff`; unreadable times are left alone."""
    if not fetched_at:
        return False
    try:
        return as_utc(datetime.fromisoformat(as_text(fetched_at))) < cutoff
    except ValueError:
        return False


def remove_expired_images(folder: Path, cutoff: float) -> int:
    """Delete the folders of image jobs (named by their 32-hex job id) last changed before
    `cutoff` (unix time); anything else stays. Blocking: run it in a thread."""

    def ours(entry: os.DirEntry[str]) -> bool:
        return bool(IMAGE_JOB_FOLDER.fullmatch(entry.name)) and entry.is_dir(follow_symlinks=False)

    return _remove_old_entries(folder, cutoff, ours, shutil.rmtree)


def _remove_old_entries(
    folder: Path,
    cutoff: float,
    ours: Callable[[os.DirEntry[str]], bool],
    remove: Callable[[str], object],
) -> int:
    """Remove the entries of `folder` that are `ours` and last modified before `cutoff`."""
    try:
        with os.scandir(folder) as it:
            entries = list(it)
    except FileNotFoundError:
        return 0  # nothing was ever written there
    removed = 0
    for entry in entries:
        try:
            if not ours(entry) or entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                continue
            remove(entry.path)
        except FileNotFoundError:
            continue  # another worker's cleanup got there first
        removed += 1
    return removed
