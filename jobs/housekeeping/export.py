"""Export stored documents to a CSV, JSON Lines or XLSX file, streamed chunk by chunk.

Only one chunk of documents (`CHUNK` of them) is in memory at a time, however many match: ids are
paged out of Redis, each page is fetched with one pipeline and written before the next is read.
The file is written under a temporary name and renamed when complete, so a download never sees a
half-written export.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import re
import zipfile
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal
from xml.parsers import expat

from openpyxl import Workbook
from openpyxl.cell import WriteOnlyCell
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from redis.asyncio import Redis

from asyncjobs.errors import PermanentJobError
from asyncjobs.keys import DOC_CHANGED_KEY, DOC_KEY_PREFIX, HEX_ID_PATTERN, source_docs_key
from jobs.context import WorkerContext
from jobs.engine.monitor import Progress
from jobs.retry import builtin
from jobs.scrape.documents import StoredDocument, parse_document
from jobs.values import as_text

log = logging.getLogger(__name__)

ExportFormat = Literal["csv", "jsonl", "xlsx"]
# rfc4180: UTF-8, CRLF line ends; excel: the same with a byte-order mark, without which Excel
# reads UTF-8 as the machine's legacy code page and garbles every non-ASCII character.
CsvDialect = Literal["rfc4180", "excel"]
CSV_ENCODINGS: dict[str, str] = {"rfc4180": "utf-8", "excel": "utf-8-sig"}

CHUNK = 200
# No anchors, no capturing groups: it is also used inside an aiohttp route pattern.
EXPORT_NAME_PATTERN = rf"{HEX_ID_PATTERN}\.(?:csv|jsonl|xlsx)"
CONTENT_TYPES: dict[str, str] = {
    "csv": "text/csv; charset=utf-8",
    "jsonl": "application/x-ndjson",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
}
XLSX_CELL_MAX = 32_767  # characters Excel keeps in one cell
# Every code point outside XML 1.0's Char production: C0 controls but tab, LF and CR; lone
# surrogates; U+FFFE and U+FFFF. openpyxl's own check misses the last three: lxml then refuses
# the row, and the standard library writes them into a file no spreadsheet opens.
XML_FORBIDDEN_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
FIELDS = (
    "id",
    "url",
    "final_url",
    "status",
    "title",
    "description",
    "links_count",
    "text_length",
    "content_hash",
    "fetched_at",
    "changed_at",
    "source_id",
    "text",
)
_FIELD_SET: set[str] = set(FIELDS)  # model_dump wants a set


class ExportFilter(BaseModel):
    """Which documents to export; no field set means all of them."""

    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    # Aware only: a naive time would silently be read in the worker's local time zone.
    changed_since: AwareDatetime | None = None


class ExportRequest(BaseModel):
    """`POST /jobs/export` body, and the `request` argument of the `export` job."""

    model_config = ConfigDict(extra="forbid")

    format: ExportFormat
    filter: ExportFilter = ExportFilter()
    dialect: CsvDialect = Field(
        "rfc4180", description="CSV only: `excel` adds a UTF-8 byte-order mark for Excel"
    )

    @field_validator("dialect")
    @classmethod
    def _csv_only(cls, value: CsvDialect, info: ValidationInfo) -> CsvDialect:
        if value != "rfc4180" and info.data.get("format") != "csv":
            raise ValueError("a dialect applies to CSV exports only")
        return value


def export_name(export_id: str, fmt: ExportFormat) -> str:
    return f"{export_id}.{fmt}"


async def export_documents(
    redis: Redis,
    folder: Path,
    export_id: str,
    request: ExportRequest,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write the matching documents to `folder/<export_id>.<format>`; return name, rows, bytes."""
    if not re.fullmatch(HEX_ID_PATTERN, export_id):  # it becomes a file name
        raise ValueError(f"export id must be 32 lowercase hex digits, not {export_id!r}")
    name = export_name(export_id, request.format)
    final = folder / name
    partial = folder / f"{name}.tmp"  # deterministic: a re-run of the job overwrites it
    since = request.filter.changed_since
    await asyncio.to_thread(folder.mkdir, parents=True, exist_ok=True)
    sink: _Sink | _XlsxSink
    if request.format == "xlsx":
        sink = await asyncio.to_thread(_XlsxSink, partial)
    else:
        sink = await asyncio.to_thread(_Sink, partial, request.format, request.dialect)
    rows = 0
    try:
        async for ids in _matching_ids(redis, request.filter):
            docs = await _fetch(redis, ids)
            if since is not None:  # the source path does not filter by time on its own
                docs = [doc for doc in docs if doc.changed_at >= since]
            if docs:
                batch = [doc.model_dump(mode="json", include=_FIELD_SET) for doc in docs]
                await asyncio.to_thread(sink.write, batch)
                rows += len(batch)
            if progress is not None:
                await progress.update(rows, "writing")
        await asyncio.to_thread(sink.close)
        await asyncio.to_thread(os.replace, partial, final)  # atomic within one folder
    except BaseException:
        await asyncio.to_thread(sink.discard)
        raise
    size = (await asyncio.to_thread(final.stat)).st_size
    log.info("export %s: %d rows, %d bytes", name, rows, size)
    return {"name": name, "rows": rows, "bytes": size}


async def _matching_ids(redis: Redis, where: ExportFilter) -> AsyncIterator[list[str]]:
    if where.source is not None:
        async for ids in _source_ids(redis, where.source):
            yield ids
    else:
        async for ids in _changed_ids(redis, where.changed_since):
            yield ids


async def _changed_ids(redis: Redis, since: datetime | None) -> AsyncIterator[list[str]]:
    """Ids by change time, oldest first, `CHUNK` at a time.

    Pages resume after the last score seen (skipping the ids already given at that score) rather
    than at a running offset: a document that changes during the export moves to the end of the
    zset, which under a plain offset would shift an unchanged document past the cursor, unseen.
    """
    low: float | str = since.timestamp() if since is not None else "-inf"
    skip = 0  # ids with score == low already given
    while True:
        page: list[tuple[bytes, float]] = await redis.zrangebyscore(
            DOC_CHANGED_KEY, low, "+inf", start=skip, num=CHUNK, withscores=True
        )
        if not page:
            return
        yield [as_text(member) for member, _ in page]
        if len(page) < CHUNK:
            return
        last = page[-1][1]
        ties = sum(1 for _, score in page if score == last)
        skip = skip + ties if last == low else ties
        low = last


async def _source_ids(redis: Redis, source: str) -> AsyncIterator[list[str]]:
    """A source's ids via SSCAN (never SMEMBERS: the set may be large), at most `CHUNK` at a time.

    SSCAN may return an id twice if the set is resized meanwhile; remembering every id to drop
    such repeats would make memory grow with the export, so they are not removed.
    """
    key = source_docs_key(source)
    cursor = 0
    while True:
        cursor, members = await redis.sscan(key, cursor, count=CHUNK)
        for start in range(0, len(members), CHUNK):  # small sets come back whole
            yield [as_text(member) for member in members[start : start + CHUNK]]
        if cursor == 0:
            return


async def _fetch(redis: Redis, ids: list[str]) -> list[StoredDocument]:
    """The documents of one page in one round trip; ids whose document is gone are dropped."""
    async with redis.pipeline(transaction=False) as pipe:
        for doc_id in ids:
            pipe.hgetall(DOC_KEY_PREFIX + doc_id)
        raws = await pipe.execute()
    docs = []
    for doc_id, raw in zip(ids, raws, strict=True):
        try:
            doc = parse_document(doc_id, raw)
        except ValidationError as exc:  # not "invalid job arguments", which retry.py would say
            raise PermanentJobError(f"stored document {doc_id} is unreadable: {exc}") from exc
        if doc is not None:
            docs.append(doc)
    return docs


# A spreadsheet runs a cell that starts with one of these as a formula ("CSV injection"); scraped
# titles and texts come from anyone's pages.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula gets a leading apostrophe (OWASP's
    advice), so it shows as text; JSONL keeps values as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def xml_text(value: str) -> str:
    """`value` without the characters XML 1.0 cannot hold (they are dropped)."""
    return XML_FORBIDDEN_RE.sub("", value)


def check_xlsx_parses(path: Path) -> None:
    """Parse every XML part of a written XLSX, streaming (expat, nothing kept): a file that no
    spreadsheet could open fails the job for good instead of being reported complete. Costs
    a fraction of the writing (measured in tests/housekeeping/test_export_xml_chars.py)."""
    try:
        with zipfile.ZipFile(path) as book:
            for member in book.namelist():
                if member.endswith((".xml", ".rels")):
                    with book.open(member) as part:
                        expat.ParserCreate().ParseFile(part)
    except (zipfile.BadZipFile, expat.ExpatError) as exc:
        raise PermanentJobError(f"the XLSX written does not open: {exc}") from exc


class _XlsxSink:
    """An XLSX file in openpyxl's write-only mode: rows go to a temporary file as they come,
    so memory stays flat however many there are. Every method blocks (run in a thread)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._book = Workbook(write_only=True)
        self._sheet = self._book.create_sheet("documents")
        self._sheet.append(list(FIELDS))

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self._sheet.append([self._cell(row[field]) for field in FIELDS])

    def _cell(self, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        # Text stays text: typed as a string, a leading "=" is never a formula; characters XML
        # cannot hold are dropped, and a cell keeps what Excel can show. Line breaks become LF
        # here: the stdlib writer leaves a CR for the XML parser to turn into LF, lxml escapes
        # it, so without this the file would depend on which writer openpyxl picked.
        text = xml_text(value).replace("\r\n", "\n").replace("\r", "\n")
        cell = WriteOnlyCell(self._sheet, text[:XLSX_CELL_MAX])
        cell.data_type = "s"
        return cell

    def close(self) -> None:
        self._book.save(self._path)
        check_xlsx_parses(self._path)
        with self._path.open("rb") as saved:
            os.fsync(saved.fileno())

    def discard(self) -> None:
        self._path.unlink(missing_ok=True)


class _Sink:
    """The open export file; every method blocks, so callers run them in a thread."""

    def __init__(self, path: Path, fmt: ExportFormat, dialect: CsvDialect = "rfc4180") -> None:
        self._path = path
        self._format = fmt
        encoding = CSV_ENCODINGS[dialect] if fmt == "csv" else "utf-8"
        self._file: IO[str] = path.open("w", encoding=encoding, newline="")
        self._csv = csv.writer(self._file)
        if fmt == "csv":
            self._csv.writerow(FIELDS)

    def write(self, rows: list[dict[str, Any]]) -> None:
        if self._format == "csv":
            self._csv.writerows([[csv_cell(row[field]) for field in FIELDS] for row in rows])
        else:
            lines = (json.dumps({field: row[field] for field in FIELDS}) for row in rows)
            self._file.write("".join(f"{line}\n" for line in lines))

    def close(self) -> None:
        """Flush to disk before the rename, so a crash cannot leave a complete name, empty."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        self._file.close()
        self._path.unlink(missing_ok=True)


@builtin("export", "maintenance", endpoint="export", schedulable=True, shown=("request.format",))
async def export(ctx: WorkerContext, export_id: str, request: dict[str, Any]) -> dict[str, Any]:
    """arq job: validate the request (a ValidationError is permanent) and write the file."""
    if not re.fullmatch(HEX_ID_PATTERN, export_id):
        raise PermanentJobError(f"export id must be 32 lowercase hex digits, not {export_id!r}")
    spec = ExportRequest.model_validate(request)
    redis = ctx.redis
    progress = Progress(redis, ctx.job_id, total=await _count_matching(redis, spec.filter))
    result = await export_documents(redis, ctx.settings.exports_dir, export_id, spec, progress)
    await progress.update(result["rows"], "done")
    return result


async def _count_matching(redis: Redis, where: ExportFilter) -> int:
    """Roughly how many rows to expect, for the progress bar (the source filter's time part
    is applied while writing, so it may over-count)."""
    if where.source is not None:
        return int(await redis.scard(source_docs_key(where.source)))  # type: ignore[misc]
    since = where.changed_since.timestamp() if where.changed_since else "-inf"
    return int(await redis.zcount(DOC_CHANGED_KEY, since, "+inf"))
