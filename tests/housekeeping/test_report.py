"""The analysis report: exact figures from known documents, sources and failures; its API."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any, cast

from arq.connections import ArqRedis
from arq.typing import WorkerCoroutine
from arq.worker import func
from selectolax.lexbor import LexborHTMLParser

from asyncjobs.keys import REPORT_KEY, SOURCES_KEY, source_failures_key
from asyncjobs.settings import Settings
from jobs.housekeeping.report import build_report, latest_report, report
from jobs.retry import max_tries
from jobs.scrape.documents import record_unchanged, save_document
from tests.conftest import start_worker, stop_worker
from tests.helpers import ApiClient
from tests.housekeeping.test_cleanup import NOW, snapshot
from tests.jobwait import wait_job

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
EMPTY_BUCKET: dict[str, Any] = {
    "pages": 0,
    "changed_last_day": 0,
    "changed_last_week": 0,
    "avg_fetch_ms": None,
    "failures": {},
}


async def save(
    redis: ArqRedis,
    url: str,
    age: timedelta,
    fetch_ms: float,
    title: str | None,
    source_id: str | None = None,
) -> None:
    page = snapshot(
        url, f"text of {url} {age}", NOW - age, source_id=source_id, title=title, fetch_ms=fetch_ms
    )
    assert await save_document(redis, page)


async def test_report_figures(redis: ArqRedis) -> None:
    await redis.sadd(SOURCES_KEY, "alpha", "beta")  # type: ignore[misc]
    await redis.hset(  # type: ignore[misc]
        source_failures_key("alpha"),
        mapping={"HTTP 404": 3, "timeout": 1, "disallowed by robots.txt": 2},
    )
    await redis.hset(source_failures_key("gone"), mapping={"timeout": 9})  # type: ignore[misc]

    # alpha: changed 2 h, 3 d and 10 d ago; the last one re-checked (unchanged) an hour ago.
    await save(redis, "https://alpha.example/1", 2 * HOUR, 100, "Python asyncio guide", "alpha")
    await save(redis, "https://alpha.example/2", 20 * DAY, 999, "old title", "alpha")
    await save(redis, "https://alpha.example/2", 3 * DAY, 200.5, "Python packaging", "alpha")
    await save(redis, "https://alpha.example/3", 10 * DAY, 50, None, "alpha")
    await record_unchanged(redis, "https://alpha.example/3", NOW - HOUR, 60)
    # ad hoc: changed 5 h ago, 8 d ago (re-checked since), and exactly 7 d ago.
    await save(redis, "https://adhoc.example/1", 5 * HOUR, 10, "Redis streams explained")
    await save(redis, "https://adhoc.example/2", 8 * DAY, 30, "Redis: the guide, 2nd edition!")
    await record_unchanged(redis, "https://adhoc.example/2", NOW - HOUR, 20)
    await save(redis, "https://adhoc.example/3", 7 * DAY, 0, "PYTHON")
    # a deleted source's document, not yet cleaned up
    await save(redis, "https://gone.example/1", HOUR, 5000, "Python redis", "gone")

    built = await build_report(redis, NOW)

    assert built == {
        "generated_at": "2025-03-01T12:00:00+00:00",
        "documents": 7,
        "orphaned_documents": 1,
        "sources": {
            "alpha": {
                "pages": 3,
                "changed_last_day": 1,
                "changed_last_week": 2,
                "avg_fetch_ms": 120.2,  # (100 + 200.5 + 60) / 3
                "failures": {"HTTP 404": 3, "disallowed by robots.txt": 2, "timeout": 1},
            },
            "beta": EMPTY_BUCKET,
            "ad-hoc": {
                "pages": 3,
                "changed_last_day": 1,
                "changed_last_week": 2,
                "avg_fetch_ms": 10.0,  # (10 + 20 + 0) / 3
                "failures": {},
            },
        },
        "top_words": [
            ["python", 4],
            ["redis", 3],
            ["guide", 2],
            ["asyncio", 1],
            ["edition", 1],
            ["explained", 1],
            ["packaging", 1],
            ["streams", 1],
        ],
    }
    raw = await redis.get(REPORT_KEY)
    assert raw is not None and json.loads(raw) == built
    assert await latest_report(redis) == built


async def test_top_words_keeps_twenty_most_frequent(redis: ArqRedis) -> None:
    """Ties are ordered by word; words are runs of 4+ letters in any script, lowercased."""
    nato = (
        "Alfa Bravo Charlie Delta Echo Foxtrot Golf Hotel India Juliett Kilo Lima Mike November "
        "Oscar Papa Quebec Romeo Sierra Tango Uniform Victor Whiskey Xray Yankee Zulu"
    )
    await save(redis, "https://w.example/1", HOUR, 1, nato)
    await save(redis, "https://w.example/2", HOUR, 1, "zulu YANKEE 2024 abc x-ray Ärger")
    await save(redis, "https://w.example/3", HOUR, 1, "ärger")
    built = await build_report(redis, NOW)
    words = ["alfa", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india"]
    words += ["juliett", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec"]
    expected = [["yankee", 2], ["zulu", 2], ["ärger", 2]] + [[w, 1] for w in words]
    assert built["top_words"] == expected
    assert len(expected) == 20


async def test_report_of_an_empty_store(redis: ArqRedis) -> None:
    assert await latest_report(redis) is None
    built = await build_report(redis, NOW)
    assert built == {
        "generated_at": "2025-03-01T12:00:00+00:00",
        "documents": 0,
        "orphaned_documents": 0,
        "sources": {"ad-hoc": EMPTY_BUCKET},
        "top_words": [],
    }


async def test_report_api_runs_the_job_and_serves_the_latest(
    api: ApiClient, redis: ArqRedis, settings: Settings
) -> None:
    missing = await api.get("/reports/latest")
    assert missing.status == 404
    assert await missing.json() == {
        "error": "not_found",
        "message": "no report yet: POST /jobs/report",
        "details": [],
    }

    await redis.sadd(SOURCES_KEY, "alpha")  # type: ignore[misc]
    await save(redis, "https://alpha.example/1", HOUR, 100, "Python asyncio guide", "alpha")
    headers = {"Idempotency-Key": "report-1"}
    response = await api.post("/jobs/report", headers=headers)
    assert response.status == 202
    accepted: dict[str, Any] = await response.json()
    assert set(accepted) == {"job_id", "status_url"}
    assert accepted["status_url"] == f"/jobs/{accepted['job_id']}"
    replayed = await api.post("/jobs/report", headers=headers)
    assert await replayed.json() == accepted
    assert await redis.zcard(settings.queue_name) == 1

    tries = max_tries(settings, "maintenance") + 1
    functions = [func(cast(WorkerCoroutine, report), name="report", max_tries=tries)]
    worker, task = await start_worker(settings, functions=functions)
    try:
        status = await wait_job(api, accepted["job_id"])
    finally:
        await stop_worker(worker, task)
    assert status["status"] == "complete", status
    assert status["function"] == "report"

    served = await api.get("/reports/latest")
    assert served.status == 200
    body = await served.json()
    assert body == status["result"]
    assert body["documents"] == 1
    assert body["sources"]["alpha"]["pages"] == 1
    assert body["top_words"] == [["asyncio", 1], ["guide", 1], ["python", 1]]


async def test_the_html_report_shows_the_same_figures_escaped(
    api: ApiClient, redis: ArqRedis
) -> None:
    """Parsed back with selectolax: one row per source with the JSON report's figures, and a
    title word that looks like markup shown as text."""
    assert (await api.get("/reports/latest.html")).status == 404
    await redis.sadd(SOURCES_KEY, "alpha")  # type: ignore[misc]
    await save(
        redis, "https://alpha.example/1", HOUR, 100, "Python <script>alert</script>", "alpha"
    )
    await redis.hset(source_failures_key("alpha"), mapping={"timeout": 2})  # type: ignore[misc]
    built = await build_report(redis, NOW)
    response = await api.get("/reports/latest.html")
    assert response.status == 200 and response.content_type == "text/html"
    page = LexborHTMLParser(await response.text())
    assert page.css_first("script") is None
    cells = [
        [td.text(strip=True) for td in row.css("td")]
        for row in page.css("table")[0].css("tbody tr")
    ]
    rows = {first: rest for first, *rest in cells}
    alpha = built["sources"]["alpha"]
    assert rows["alpha"] == [
        str(alpha["pages"]), str(alpha["changed_last_day"]), str(alpha["changed_last_week"]),
        str(alpha["avg_fetch_ms"]), "timeout: 2",
    ]  # fmt: skip
    words = [row.css("td")[0].text() for row in page.css("table")[1].css("tbody tr")]
    assert words == [word for word, _ in built["top_words"]] and "script" in words
