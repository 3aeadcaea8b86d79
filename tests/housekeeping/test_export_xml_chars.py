"""XLSX exports hold any text: every code point XML 1.0 forbids is dropped from the cells, with
openpyxl's lxml writer and with its standard-library one, and a written file that would not
open fails the job instead of completing. CSV's `excel` dialect: a byte-order mark for Excel.
Every file is read back (openpyxl, csv)."""

from __future__ import annotations

import csv
import importlib
import io
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import openpyxl.xml
import pytest
from arq.connections import ArqRedis
from openpyxl import load_workbook

from asyncjobs.errors import PermanentJobError
from asyncjobs.settings import Settings
from jobs.housekeeping.export import (
    FIELDS,
    ExportRequest,
    _XlsxSink,
    check_xlsx_parses,
    export_documents,
    xml_text,
)
from tests.conftest import api_and_worker
from tests.helpers import ApiClient
from tests.housekeeping.test_export import expected_rows, new_id, save_all, snapshot
from tests.jobwait import wait_job

REPO = Path(__file__).resolve().parents[2]
# `jobs.housekeeping.export` the attribute is the job function; the module, for monkeypatching
EXPORT_MODULE = importlib.import_module("jobs.housekeeping.export")

C0_FORBIDDEN = [cp for cp in range(0x20) if cp not in (0x09, 0x0A, 0x0D)]
NONCHARACTERS = [0xFFFE, 0xFFFF]
SURROGATES = list(range(0xD800, 0xE000))
FORBIDDEN = C0_FORBIDDEN + NONCHARACTERS + SURROGATES  # all of them: 29 + 2 + 2048
SURROGATE_SAMPLE = [0xD800, 0xDA00, 0xDBFF, 0xDC00, 0xDE00, 0xDFFF]
# Their neighbours that XML allows, the edges of every allowed range
ALLOWED = [0x09, 0x0A, 0x0D, 0x20, 0x7F, 0x85, 0xD7FF, 0xE000, 0xFFFD, 0x10000, 0x10FFFF]


def cell_text(cp: int) -> str:
    return f"before {chr(cp)} after"


@pytest.mark.parametrize(
    "cp", C0_FORBIDDEN + NONCHARACTERS + SURROGATE_SAMPLE, ids=lambda cp: f"U+{cp:04X}"
)
def test_each_forbidden_code_point_is_dropped(cp: int) -> None:
    assert xml_text(cell_text(cp)) == "before  after"


def test_every_forbidden_code_point_and_only_those() -> None:
    assert [cp for cp in FORBIDDEN if xml_text(chr(cp))] == []
    kept = "".join(chr(cp) for cp in ALLOWED)
    assert xml_text(kept) == kept


def blank_row(**values: Any) -> dict[str, Any]:
    return {field: None for field in FIELDS} | values


def write_every_forbidden_code_point(path: Path) -> None:
    """One row per forbidden code point, its title holding it; then one row of all of them."""
    sink = _XlsxSink(path)
    rows = [blank_row(id=f"U+{cp:04X}", title=cell_text(cp)) for cp in FORBIDDEN]
    rows.append(blank_row(id="all", title="x" + "".join(map(chr, FORBIDDEN)) + "y"))
    sink.write(rows)
    sink.close()  # it also parses the file written


def read_rows(source: Path | io.BytesIO) -> list[dict[str, Any]]:
    """The sheet's rows by field; openpyxl leaves out a row's empty cells at its end."""
    book = load_workbook(source, read_only=True)
    try:
        rows = book["documents"].iter_rows(values_only=True)
        assert next(rows) == FIELDS
        return [dict(zip(FIELDS, row, strict=False)) for row in rows]
    finally:
        book.close()


def assert_every_title_is_clean(path: Path) -> None:
    """Read back by openpyxl (which parses the XML strictly): each cell without its code point."""
    rows = read_rows(path)
    assert len(rows) == len(FORBIDDEN) + 1
    for cp, row in zip(FORBIDDEN, rows, strict=False):
        assert (row["id"], row["title"]) == (f"U+{cp:04X}", "before  after")
    assert (rows[-1]["id"], rows[-1]["title"]) == ("all", "xy")


def test_every_forbidden_code_point_in_this_process_writer(tmp_path: Path) -> None:
    """With whichever writer openpyxl picked in the test process (lxml when installed)."""
    path = tmp_path / "in-process.xlsx"
    write_every_forbidden_code_point(path)
    assert_every_title_is_clean(path)


WRITE_IN_CHILD = """
import sys
from pathlib import Path
import openpyxl.xml
assert openpyxl.xml.LXML is (sys.argv[2] == "True"), openpyxl.xml.LXML
from tests.housekeeping.test_export_xml_chars import write_every_forbidden_code_point
write_every_forbidden_code_point(Path(sys.argv[1]))
"""


def lxml_importable() -> bool:
    try:
        importlib.import_module("lxml.etree")
    except ImportError:
        return False
    return True


@pytest.mark.parametrize(
    "use_lxml",
    [
        pytest.param(True, id="lxml", marks=pytest.mark.skipif(
            not lxml_importable(), reason="lxml is not installed: only the stdlib writer is used"
        )),
        pytest.param(False, id="stdlib"),
    ],
)  # fmt: skip
def test_every_forbidden_code_point_with_each_openpyxl_writer(
    tmp_path: Path, use_lxml: bool
) -> None:
    """openpyxl chooses its writer once, at import, from OPENPYXL_LXML: a fresh process each.
    Before the fix lxml refused U+FFFE (ValueError) and the stdlib wrote an unreadable file."""
    path = tmp_path / f"lxml-{use_lxml}.xlsx"
    env = os.environ | {"OPENPYXL_LXML": str(use_lxml)}  # `-c` in REPO imports tests.*
    child = subprocess.run(
        [sys.executable, "-c", WRITE_IN_CHILD, str(path), str(use_lxml)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == 0, child.stderr
    assert_every_title_is_clean(path)


def test_a_file_that_does_not_parse_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "broken.xlsx"
    with zipfile.ZipFile(path, "w") as book:
        book.writestr("[Content_Types].xml", "<Types/>")
        book.writestr("xl/sharedStrings.xml", "<sst><si><t>a\ufffeb</t></si></sst>")
    with pytest.raises(PermanentJobError, match="does not open"):
        check_xlsx_parses(path)
    path.write_bytes(b"not a zip")
    with pytest.raises(PermanentJobError, match="does not open"):
        check_xlsx_parses(path)


async def test_an_export_whose_file_would_not_open_never_completes(
    redis: ArqRedis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the cleaning, U+FFFE reaches the writer: the stdlib one writes a broken file,
    which the check after saving refuses; lxml refuses the row. No file is left either way."""
    clean = {"title": "a\ufffeb", "text": "text", "description": None}  # no C0: openpyxl's own
    await save_all(redis, [snapshot(1).model_copy(update=clean)])  # check refuses those
    monkeypatch.setattr(EXPORT_MODULE, "xml_text", lambda value: value)
    error = PermanentJobError if not openpyxl.xml.LXML else ValueError
    with pytest.raises(error):
        await export_documents(redis, tmp_path, new_id(1), ExportRequest(format="xlsx"))
    assert list(tmp_path.iterdir()) == []


def test_checking_the_written_file_costs_a_fraction_of_writing_it(
    tmp_path: Path, fault_report: Callable[[str], None]
) -> None:
    """10,000 rows of 500 characters of text, as in test_export's memory test."""
    path = tmp_path / "big.xlsx"
    rows = [
        blank_row(id=f"{i:032x}", title=f"Title {i}", links_count=i, text="ünï " + "x" * 500)
        for i in range(10_000)
    ]
    started = time.perf_counter()
    sink = _XlsxSink(path)
    sink.write(rows)
    sink.close()  # includes the check
    total = time.perf_counter() - started
    started = time.perf_counter()
    check_xlsx_parses(path)
    check = time.perf_counter() - started
    fault_report(
        f"xlsx check of 10,000 rows ({path.stat().st_size / 1024:,.0f} KiB): {check:.3f} s "
        f"of {total:.2f} s writing with it ({check / total:.0%})"
    )
    assert check < total / 2


@pytest.fixture
async def stack(
    make_settings: Callable[..., Settings], redis: ArqRedis, tmp_path: Path
) -> AsyncIterator[ApiClient]:
    async with api_and_worker(make_settings(exports_dir=tmp_path / "exports")) as client:
        yield client


async def run_export(api: ApiClient, body: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    """POST the export, wait for the worker to finish it, download it."""
    response = await api.post("/jobs/export", json=body)
    assert response.status == 202, await response.text()
    accepted = await response.json()
    status = await wait_job(api, accepted["job_id"])
    assert status["status"] == "complete", status
    download = await api.get(accepted["download_url"])
    assert download.status == 200
    return status, await download.read()


async def test_xlsx_export_of_documents_holding_forbidden_characters(
    stack: ApiClient, redis: ArqRedis
) -> None:
    """Through the API and a worker. Redis stores UTF-8, in which a lone surrogate cannot be
    written: the documents carry the C0 controls and U+FFFE/U+FFFF (the surrogates are covered
    by the writer tests above)."""
    points = C0_FORBIDDEN + NONCHARACTERS
    snaps = [
        snapshot(i).model_copy(update={"title": cell_text(cp), "description": chr(cp) * 3})
        for i, cp in enumerate(points)
    ]
    ids = await save_all(redis, snaps)
    status, body = await run_export(stack, {"format": "xlsx"})
    assert status["result"]["rows"] == len(points)
    rows = {row["id"]: row for row in read_rows(io.BytesIO(body))}
    assert set(rows) == set(ids)
    for doc_id in ids:
        assert rows[doc_id]["title"] == "before  after"
        assert rows[doc_id]["description"] in (None, "")


NON_ASCII = "Zoë\u2019s café, 日本語, emoji 🎉, Ελληνικά"


async def test_csv_excel_dialect_has_a_bom_and_crlf_and_round_trips(
    stack: ApiClient, redis: ArqRedis
) -> None:
    snaps = [
        snapshot(i).model_copy(update={"title": f"{NON_ASCII} {i}", "description": "a\nb"})
        for i in range(30)
    ]
    ids = await save_all(redis, snaps)
    expected = await expected_rows(redis, ids)
    _, body = await run_export(stack, {"format": "csv", "dialect": "excel"})
    header = ",".join(FIELDS).encode() + b"\r\n"
    assert body.startswith(b"\xef\xbb\xbf" + header) and body.endswith(b"\r\n")
    rows = list(csv.DictReader(io.StringIO(body.decode("utf-8-sig"), newline="")))
    assert {row["id"] for row in rows} == set(ids)
    for row in rows:
        want = expected[row["id"]]
        assert row["title"] == want["title"] and NON_ASCII in row["title"]
        assert row["description"] == "a\nb"  # a line break inside a cell stays LF, quoted
        assert row["text"] == want["text"]

    _, plain = await run_export(stack, {"format": "csv"})  # the default: the same, no BOM
    assert plain == body.removeprefix(b"\xef\xbb\xbf")


@pytest.mark.parametrize(
    "body",
    [
        {"format": "xlsx", "dialect": "excel"},
        {"format": "jsonl", "dialect": "excel"},
        {"format": "csv", "dialect": "excel-tab"},
    ],
)
async def test_a_dialect_is_for_csv_only(
    api: ApiClient, redis: ArqRedis, body: dict[str, Any]
) -> None:
    response = await api.post("/jobs/export", json=body)
    assert response.status == 422
    assert [d["field"] for d in (await response.json())["details"]] == ["dialect"]
    assert await redis.zcard("arq:queue") == 0
