"""Running a source now (`POST /sources/{id}/run`, the dashboard's Run now button) and what
each run came to (`GET /sources/{id}/runs`), with a real worker crawling a loopback site."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from arq.connections import ArqRedis

from app.web import create_app
from asyncjobs.keys import (
    source_failures_key,
    source_run_info_key,
    source_run_pages_key,
    source_runs_key,
)
from asyncjobs.settings import Settings
from jobs.scrape import runs
from jobs.scrape.documents import document_id, load_document
from jobs.scrape.runs import SOURCE_RUNS_KEPT, start_run
from jobs.scrape.scheduler import schedule_sources, source_job_id
from tests.conftest import READ_KEY, Ctx, start_worker, stop_worker
from tests.dashboard.test_dashboard import csrf_of, log_in
from tests.helpers import ApiClient, wait_for
from tests.servers import DOCS_PAGES, SiteStats

DOCS = [f"/docs/{n}" for n in range(DOCS_PAGES + 1)]  # /docs/5, linked too, is missing
NEVER_DUE = "0 0 1 1 *"  # the tick starts no run of its own while a test runs


async def add_source(api: ApiClient, **fields: Any) -> str:
    response = await api.post("/sources", json={"schedule": NEVER_DUE} | fields)
    assert response.status == 201, await response.text()
    source_id: str = (await response.json())["id"]
    return source_id


async def run_now(api: ApiClient, source_id: str, **body: Any) -> dict[str, Any]:
    response = await api.post(f"/sources/{source_id}/run", json=body)
    assert response.status == 202, await response.text()
    accepted: dict[str, Any] = await response.json()
    return accepted


async def list_runs(api: ApiClient, source_id: str) -> list[dict[str, Any]]:
    response = await api.get(f"/sources/{source_id}/runs")
    assert response.status == 200, await response.text()
    found: list[dict[str, Any]] = (await response.json())["runs"]
    return found


async def finished_run(api: ApiClient, source_id: str, run_id: str) -> dict[str, Any]:
    async def finished() -> dict[str, Any] | None:
        run = next(r for r in await list_runs(api, source_id) if r["run_id"] == run_id)
        return run if run["status"] == "finished" else None

    return await wait_for(finished, timeout=30, what=f"run {run_id} to finish")


def counts(run: dict[str, Any]) -> dict[str, Any]:
    names = ["pages", "fetched", "changed", "unchanged", "not_modified", "failed", "pending",
             "aborted", "failures"]  # fmt: skip
    return {name: run[name] for name in names}


async def test_run_now_summarizes_each_run_and_refuses_a_second_meanwhile(
    api: ApiClient,
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    site: tuple[str, SiteStats],
) -> None:
    base, stats = site
    source_id = await add_source(
        api, url=f"{base}/docs/0", follow_links=1, max_pages=10,
        selectors={"title": {"css": "h1.title"}},
    )  # fmt: skip
    first = await run_now(api, source_id)  # no worker yet: the run waits in the queue
    assert first["job_id"] == source_job_id(source_id, int(first["run_id"]))
    assert first["runs_url"] == f"/sources/{source_id}/runs"
    busy = await api.post(f"/sources/{source_id}/run")
    assert busy.status == 409 and first["run_id"] in (await busy.json())["message"]
    [waiting] = await list_runs(api, source_id)
    assert (waiting["status"], waiting["trigger"], waiting["pending"]) == ("running", "manual", 1)

    worker, task = await start_worker(make_settings(), cron_jobs=[])
    try:
        done = await finished_run(api, source_id, first["run_id"])
        assert counts(done) == {"pages": 6, "fetched": 5, "changed": 5, "unchanged": 0,
                                "not_modified": 0, "failed": 1, "pending": 0, "aborted": 0,
                                "failures": {"http_4xx": 1}}  # fmt: skip
        assert not stats.conditional  # never seen before: nothing to be conditional about

        second = await run_now(api, source_id)  # validators stored: conditional requests
        done = await finished_run(api, source_id, second["run_id"])
        assert counts(done) == {"pages": 6, "fetched": 5, "changed": 0, "unchanged": 5,
                                "not_modified": 5, "failed": 1, "pending": 0, "aborted": 0,
                                "failures": {"http_4xx": 1}}  # fmt: skip
        assert all(stats.not_modified[path] == 1 for path in DOCS[:-1]), stats.not_modified

        forced = await run_now(api, source_id, force=True)
        done = await finished_run(api, source_id, forced["run_id"])
        assert (done["force"], done["changed"], done["unchanged"], done["not_modified"]) == (
            True, 0, 5, 0)  # fmt: skip
        assert all(stats.hits[path] == 3 for path in DOCS[:-1]), stats.hits
        assert all(stats.conditional[path] == 1 for path in DOCS[:-1]), stats.conditional
    finally:
        await stop_worker(worker, task)

    listed = await list_runs(api, source_id)
    assert [r["run_id"] for r in listed] == [forced["run_id"], second["run_id"], first["run_id"]]
    assert all(r["finished_at"] >= r["started_at"] for r in listed)
    failures = await redis.hgetall(source_failures_key(source_id))  # type: ignore[misc]
    assert failures == {b"http_4xx": b"3"}  # /docs/5 in each run, counted by its typed reason
    doc = await load_document(redis, document_id(f"{base}/docs/3"))
    assert doc is not None and doc.extracted == {"title": "Doc 3"}


async def test_a_new_source_with_selectors_extracts_from_pages_scraped_before(
    api: ApiClient,
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    site: tuple[str, SiteStats],
) -> None:
    """The page answered 304 to the source's run and the document kept `{}`."""
    base, stats = site
    url = f"{base}/docs/1"
    worker, task = await start_worker(make_settings(), cron_jobs=[])
    try:
        scraped = await api.post("/jobs/scrape", json={"url": url})
        assert scraped.status == 202

        async def stored() -> bool:
            return await load_document(redis, document_id(url)) is not None

        await wait_for(stored, what="the first scrape's document")
        source_id = await add_source(api, url=url, selectors={"h": "h1"})
        run = await run_now(api, source_id)
        done = await finished_run(api, source_id, run["run_id"])
    finally:
        await stop_worker(worker, task)
    assert (done["fetched"], done["unchanged"], done["not_modified"]) == (1, 1, 0)
    assert stats.hits["/docs/1"] == 2 and "/docs/1" not in stats.conditional
    doc = await load_document(redis, document_id(url))
    assert doc is not None and doc.extracted == {"h": ["Doc 1"]} and doc.source_id == source_id


async def test_run_requests_are_checked(api: ApiClient, redis: ArqRedis) -> None:
    missing = await api.post(f"/sources/{'0' * 32}/run")
    assert missing.status == 404
    assert (await api.get(f"/sources/{'0' * 32}/runs")).status == 404
    source_id = await add_source(api, url="http://example.com/")
    bad = await api.post(f"/sources/{source_id}/run", json={"force": "sometimes"})
    assert bad.status == 422
    assert [d["field"] for d in (await bad.json())["details"]] == ["force"]
    extra = await api.post(f"/sources/{source_id}/run", json={"url": "http://example.org/"})
    assert extra.status == 422
    assert await list_runs(api, source_id) == [] and await redis.zcard("arq:queue") == 0


async def test_an_aborted_page_ends_its_run(
    api: ApiClient,
    make_settings: Callable[..., Settings],
    site: tuple[str, SiteStats],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A page job aborted before it ran says nothing: the run is settled when it is read."""
    monkeypatch.setattr(runs, "SETTLE_GRACE_MS", 0)
    source_id = await add_source(api, url=f"{site[0]}/docs/0")
    run = await run_now(api, source_id)
    assert (await api.delete(f"/jobs/{run['job_id']}")).status == 202
    worker, task = await start_worker(make_settings(), cron_jobs=[])
    try:
        done = await finished_run(api, source_id, run["run_id"])
    finally:
        await stop_worker(worker, task)
    assert (done["pages"], done["aborted"], done["fetched"]) == (1, 1, 0)
    assert site[1].hits.get("/docs/0") is None
    assert (await api.post(f"/sources/{source_id}/run")).status == 202  # none in progress


async def test_scheduled_runs_are_recorded_once_per_period(
    make_ctx: Callable[..., Ctx], api: ApiClient, redis: ArqRedis
) -> None:
    source_id = await add_source(api, url="http://example.com/", schedule="daily")
    ctx = make_ctx(job_id="cron:schedule_sources")
    await schedule_sources(ctx)
    await schedule_sources(ctx)  # a second worker's tick in the same period
    [run] = await list_runs(api, source_id)
    assert (run["trigger"], run["status"], run["pending"]) == ("schedule", "running", 1)
    assert run["job_id"] == source_job_id(source_id, int(run["run_id"]))
    assert (await api.post(f"/sources/{source_id}/run")).status == 409


async def test_the_last_runs_are_kept_with_their_records(redis: ArqRedis) -> None:
    source_id = "f" * 32
    for period in range(SOURCE_RUNS_KEPT + 3):
        await start_run(redis, source_id, period, "schedule")
    kept = [int(r) for r in await redis.lrange(source_runs_key(source_id), 0, -1)]  # type: ignore[misc]
    assert kept == list(range(SOURCE_RUNS_KEPT + 2, 2, -1))
    for period in range(3):
        assert not await redis.exists(
            source_run_info_key(source_id, period), source_run_pages_key(source_id, period)
        )
    assert await redis.exists(source_run_info_key(source_id, 3))


async def test_deleting_a_source_deletes_its_runs(api: ApiClient, redis: ArqRedis) -> None:
    source_id = await add_source(api, url="http://example.com/")
    run = await run_now(api, source_id)
    assert (await api.delete(f"/sources/{source_id}")).status == 204
    assert not await redis.exists(
        source_runs_key(source_id), source_run_info_key(source_id, int(run["run_id"]))
    )


# -- the dashboard ----------------------------------------------------------------------------


@pytest.fixture
async def ui(settings: Settings, redis: ArqRedis) -> AsyncIterator[ApiClient]:
    """A browser-like client of the app: cookies, and no Authorization header."""
    async with TestClient(TestServer(create_app(settings), host="127.0.0.1")) as client:
        yield client


async def test_the_dashboard_runs_a_source_and_lists_its_runs(
    ui: ApiClient,
    api: ApiClient,
    make_settings: Callable[..., Settings],
    site: tuple[str, SiteStats],
) -> None:
    base, stats = site
    source_id = await add_source(api, url=f"{base}/docs/0", name="Docs <b>")
    csrf = await log_in(ui)
    listing = await (await ui.get("/ui/sources")).text()
    assert f'href="/ui/sources/{source_id}"' in listing and "Docs &lt;b&gt;" in listing
    page = await (await ui.get(f"/ui/sources/{source_id}")).text()
    assert "No runs yet." in page and f'action="/ui/sources/{source_id}/run"' in page
    assert csrf_of(page) == csrf

    forged = await ui.post(f"/ui/sources/{source_id}/run", data={}, allow_redirects=False)
    assert forged.status == 403
    started = await ui.post(
        f"/ui/sources/{source_id}/run", data={"csrf": csrf, "force": "1"}, allow_redirects=False
    )
    assert started.status == 303 and started.headers["Location"] == f"/ui/sources/{source_id}"
    busy = await ui.post(f"/ui/sources/{source_id}/run", data={"csrf": csrf})
    assert busy.status == 409 and "in progress" in await busy.text()
    [run] = await list_runs(api, source_id)
    assert (run["trigger"], run["force"]) == ("manual", True)

    worker, task = await start_worker(make_settings(), cron_jobs=[])
    try:
        await finished_run(api, source_id, run["run_id"])
    finally:
        await stop_worker(worker, task)
    page = await (await ui.get(f"/ui/sources/{source_id}")).text()
    row = re.search(rf'<tr data-run-id="{run["run_id"]}">.*?</tr>', page, re.DOTALL)
    assert row is not None, page
    cells = re.findall(r"<td>(.*?)</td>", row.group(0), re.DOTALL)
    assert cells[1:4] == ["manual (forced)", "finished", "1"] and cells[4] == "1", cells
    assert stats.hits["/docs/0"] == 1


async def test_a_read_only_key_sees_the_runs_but_cannot_run(
    ui: ApiClient, api: ApiClient, redis: ArqRedis
) -> None:
    source_id = await add_source(api, url="http://example.com/")
    csrf = await log_in(ui, READ_KEY)
    page = await (await ui.get(f"/ui/sources/{source_id}")).text()
    assert re.search(r"<button type=\"submit\" disabled[^>]*>Run now</button>", page)
    refused = await ui.post(f"/ui/sources/{source_id}/run", data={"csrf": csrf})
    assert refused.status == 403 and "read-only" in await refused.text()
    assert await list_runs(api, source_id) == [] and await redis.zcard("arq:queue") == 0
    assert (await ui.get(f"/ui/sources/{'0' * 32}")).status == 404
