"""Cleanup removes exactly what is past its retention, and nothing else."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis

from asyncjobs import keys
from asyncjobs.settings import Settings
from jobs.deadletter import DeadLetter, add_dead_letter
from jobs.housekeeping.cleanup import cleanup, daily_cleanup
from jobs.scrape.documents import (
    DocumentSnapshot,
    content_hash,
    document_id,
    load_versions,
    save_document,
)
from jobs.values import now_utc

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)
RETENTION = {
    "version_retention": 10 * 86400,
    "export_ttl": 86400,
    "dead_letter_retention": 7 * 86400,
}
HEX = "0123456789abcdef" * 2  # a valid export name stem


def snapshot(
    url: str,
    text: str,
    fetched_at: datetime,
    *,
    source_id: str | None = None,
    title: str | None = None,
    fetch_ms: float = 100.0,
) -> DocumentSnapshot:
    return DocumentSnapshot(
        url=url,
        final_url=url,
        status=200,
        content_type="text/html",
        title=title,
        description=None,
        links_count=0,
        text_length=len(text),
        text=text,
        content_hash=content_hash(text),
        fetched_at=fetched_at,
        fetch_ms=fetch_ms,
        source_id=source_id,
    )


async def save_versions(
    redis: ArqRedis, url: str, ages: list[timedelta], source_id: str | None = None
) -> str:
    """One distinct version per age, saved oldest first as scrapes would; returns the doc id."""
    for n, age in enumerate(sorted(ages, reverse=True)):
        changed = await save_document(
            redis, snapshot(url, f"{url} content {n}", NOW - age, source_id=source_id)
        )
        assert changed
    return document_id(url)


async def dump(redis: ArqRedis) -> dict[str, Any]:
    """Every key with its whole content: what "nothing else changed" is checked against."""
    state: dict[str, Any] = {}
    async for raw in redis.scan_iter(count=1000):
        key = raw.decode()
        kind = (await redis.type(key)).decode()
        if kind == "string":
            state[key] = await redis.get(key)
        elif kind == "hash":
            state[key] = await redis.hgetall(key)  # type: ignore[misc]
        elif kind == "list":
            state[key] = await redis.lrange(key, 0, -1)  # type: ignore[misc]
        elif kind == "set":
            state[key] = await redis.smembers(key)  # type: ignore[misc]
        elif kind == "zset":
            state[key] = dict(await redis.zrange(key, 0, -1, withscores=True))
        else:
            raise AssertionError(f"unexpected {kind} at {key}")
    return state


def dead_letter(entry_id: str, failed_at: datetime) -> DeadLetter:
    return DeadLetter(
        id=entry_id,
        function="send_email",
        arguments={"message_id": f"<{entry_id}@x>"},
        error="550 no such mailbox",
        reason="permanent",
        tries=1,
        enqueue_time=failed_at - timedelta(seconds=5),
        failed_at=failed_at,
    )


def touch(folder: Path, name: str, age: timedelta) -> Path:
    path = folder / name
    path.write_text(name)
    mtime = (NOW - age).timestamp()
    os.utime(path, (mtime, mtime))
    return path


async def test_cleanup_removes_exactly_what_is_past_retention(
    redis: ArqRedis, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    settings = make_settings(**RETENTION, exports_dir=exports)

    # Documents: ad hoc, of a live source, and of a deleted one (versions 10 days = the boundary).
    await redis.sadd(keys.SOURCES_KEY, "live")  # type: ignore[misc]
    await redis.set("asyncjobs:source:live", '{"id": "live"}')
    a = await save_versions(redis, "https://a.example/", [30 * DAY, 20 * DAY, 5 * DAY, DAY])
    b = await save_versions(redis, "https://b.example/", [50 * DAY, 40 * DAY])  # newest is old
    c = await save_versions(redis, "https://c.example/", [15 * DAY, 10 * DAY, 2 * DAY], "live")
    f = await save_versions(redis, "https://f.example/", [100 * DAY], "live")
    d = await save_versions(redis, "https://d.example/", [30 * DAY, DAY], "gone")
    e = await save_versions(redis, "https://e.example/", [DAY], "gone")
    kept_times = {
        a: [NOW - DAY, NOW - 5 * DAY],
        b: [NOW - 40 * DAY],
        c: [NOW - 2 * DAY, NOW - 10 * DAY],
        f: [NOW - 100 * DAY],
    }

    # Dead letters: 7 days is the boundary and stays.
    for entry_id, age in [("old1", 8 * DAY), ("old2", 30 * DAY), ("edge", 7 * DAY), ("new", DAY)]:
        await add_dead_letter(redis, dead_letter(entry_id, NOW - age))

    # Exports: TTL one day; only export names and *.tmp are ours to delete.
    touch(exports, f"{HEX}.csv", 2 * DAY)
    touch(exports, f"{HEX[::-1]}.jsonl", 3 * DAY)
    touch(exports, "0123456789abcdef0123456789abcdef.csv.tmp", 2 * DAY)
    survivors = {
        touch(exports, f"{'f' * 32}.csv", timedelta(hours=1)),
        touch(exports, f"{'e' * 32}.jsonl", DAY),  # exactly at the TTL
        touch(exports, "fresh.tmp", timedelta(minutes=1)),
        touch(exports, "notes.txt", 30 * DAY),
        touch(exports, f"{HEX.upper()}.csv", 30 * DAY),
        touch(exports, f"{HEX}.csv.bak", 30 * DAY),
        touch(exports, f"{'c' * 31}.csv", 30 * DAY),
    }
    folder_named_like_an_export = exports / f"{'d' * 32}.csv"
    folder_named_like_an_export.mkdir()
    old = (NOW - 30 * DAY).timestamp()
    os.utime(folder_named_like_an_export, (old, old))
    survivors.add(folder_named_like_an_export)

    before = await dump(redis)
    counts = await cleanup(redis, settings, NOW)
    assert counts == {
        "versions": 4,
        "exports": 3,
        "images": 0,
        "orphaned_documents": 2,
        "dead_letters": 2,
    }

    # The expected state is the state before with exactly those things taken out.
    expected = dict(before)
    for doc_id in (d, e):
        for key in (keys.DOC_KEY_PREFIX + doc_id, keys.doc_versions_key(doc_id)):
            del expected[key]
        for index in (keys.DOC_INDEX_KEY, keys.DOC_CHANGED_KEY):
            expected[index] = {k: v for k, v in expected[index].items() if k != doc_id.encode()}
    del expected[keys.source_docs_key("gone")]
    expected[keys.doc_versions_key(a)] = before[keys.doc_versions_key(a)][:2]
    expected[keys.doc_versions_key(b)] = before[keys.doc_versions_key(b)][:1]
    expected[keys.doc_versions_key(c)] = before[keys.doc_versions_key(c)][:2]
    for entry_id in ("old1", "old2"):
        del expected[keys.DEAD_KEY_PREFIX + entry_id]
    expected[keys.DEAD_INDEX_KEY] = {
        k: v for k, v in before[keys.DEAD_INDEX_KEY].items() if k in {b"edge", b"new"}
    }
    assert await dump(redis) == expected

    for doc_id, times in kept_times.items():
        assert [v.fetched_at for v in await load_versions(redis, doc_id)] == times
    assert set(exports.iterdir()) == survivors
    assert all(p.read_text() == p.name for p in survivors if p.is_file())

    # A second run finds nothing more to do and changes nothing.
    again = await cleanup(redis, settings, NOW)
    assert again == {
        "versions": 0,
        "exports": 0,
        "images": 0,
        "orphaned_documents": 0,
        "dead_letters": 0,
    }
    assert await dump(redis) == expected
    assert set(exports.iterdir()) == survivors


async def test_documents_of_a_source_that_comes_back_are_kept(
    redis: ArqRedis, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Orphans are judged by membership in the sources set at cleanup time, nothing else."""
    settings = make_settings(**RETENTION, exports_dir=tmp_path)
    doc = await save_versions(redis, "https://s.example/", [DAY], "s1")
    await redis.sadd(keys.SOURCES_KEY, "s1")  # type: ignore[misc]
    before = await dump(redis)
    assert (await cleanup(redis, settings, NOW))["orphaned_documents"] == 0
    assert await dump(redis) == before

    await redis.srem(keys.SOURCES_KEY, "s1")  # type: ignore[misc]
    assert (await cleanup(redis, settings, NOW))["orphaned_documents"] == 1
    assert await dump(redis) == {}  # the source set was the last key: it went empty
    assert await redis.zscore(keys.DOC_INDEX_KEY, doc) is None


async def test_many_documents_are_walked_in_chunks(
    redis: ArqRedis, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """More documents than one ZSCAN step or pipeline holds (the index is then a hash table)."""
    settings = make_settings(**RETENTION, exports_dir=tmp_path)
    await redis.sadd(keys.SOURCES_KEY, "live")  # type: ignore[misc]
    for n in range(700):
        source = "live" if n % 7 else "gone"  # 100 orphans
        await save_versions(redis, f"https://many.example/{n}", [20 * DAY, DAY], source)
    counts = await cleanup(redis, settings, NOW)
    assert counts == {
        "versions": 600,
        "exports": 0,
        "images": 0,
        "orphaned_documents": 100,
        "dead_letters": 0,
    }
    assert await redis.zcard(keys.DOC_INDEX_KEY) == 600
    assert await redis.zcard(keys.DOC_CHANGED_KEY) == 600
    assert await redis.exists(keys.source_docs_key("gone")) == 0
    assert await redis.scard(keys.source_docs_key("live")) == 600  # type: ignore[misc]


async def test_missing_exports_folder_and_empty_store(
    redis: ArqRedis, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(**RETENTION, exports_dir=tmp_path / "never-created")
    counts = await cleanup(redis, settings, NOW)
    assert counts == {
        "versions": 0,
        "exports": 0,
        "images": 0,
        "orphaned_documents": 0,
        "dead_letters": 0,
    }
    assert not (tmp_path / "never-created").exists()


async def test_daily_cleanup_job_logs_its_counts(
    redis: ArqRedis,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The cron entry point: real clock, default retention, counts in the log and the result."""
    settings = make_settings(exports_dir=tmp_path)
    now = now_utc()
    await add_dead_letter(redis, dead_letter("ancient", now - 31 * DAY))
    await add_dead_letter(redis, dead_letter("recent", now - 29 * DAY))
    ctx: dict[str, Any] = {
        "redis": redis,
        "settings": settings,
        "job_id": "cron:daily_cleanup",
        "job_try": 1,
    }
    with caplog.at_level(logging.INFO, logger="jobs.housekeeping.cleanup"):
        result = await daily_cleanup(ctx)
    assert result == {
        "versions": 0,
        "exports": 0,
        "images": 0,
        "orphaned_documents": 0,
        "dead_letters": 1,
    }
    assert (
        "cleanup removed 0 versions, 0 exports, 0 image folders, 0 orphaned documents, "
        "1 dead letters" in caplog.messages
    )
    assert await redis.zrange(keys.DEAD_INDEX_KEY, 0, -1) == [b"recent"]


async def test_image_job_folders_go_with_the_export_ttl(
    redis: ArqRedis, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(**RETENTION, images_dir=tmp_path)
    old, fresh = tmp_path / ("a" * 32), tmp_path / ("b" * 32)
    not_ours = tmp_path / "not-a-job"
    for folder in (old, fresh, not_ours):
        folder.mkdir()
        (folder / "0-10x10.png").write_bytes(b"x")
    stale = NOW.timestamp() - settings.export_ttl - 1
    for folder in (old, not_ours):
        os.utime(folder, (stale, stale))
    counts = await cleanup(redis, settings, NOW)
    assert counts["images"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([fresh.name, not_ours.name])
