"""Sources: the API, scheduled crawls through real workers, and one scrape per period even when
several workers run the scheduler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from arq.connections import ArqRedis

from asyncjobs.keys import DOC_INDEX_KEY, source_failures_key, source_run_key
from asyncjobs.settings import Settings
from jobs.scrape.documents import document_id, load_document
from jobs.scrape.page import scrape_page
from jobs.scrape.scheduler import TICK_KEY, scrape_source, source_job_id
from jobs.scrape.sources import SourceSpec, create_source
from tests.conftest import Ctx, start_worker, stop_worker
from tests.helpers import ApiClient, wait_for
from tests.servers import CrawlStats

GOOD = {"url": "http://example.com/news", "schedule": "daily"}


@pytest.mark.parametrize(
    ("body", "field", "text"),
    [
        (GOOD | {"schedule": "every day"}, "schedule", "5-field cron expression"),
        (GOOD | {"schedule": "61 * * * *"}, "schedule", "cron expression"),
        (GOOD | {"url": "ftp://example.com/"}, "url", "scheme"),
        (GOOD | {"follow_links": 3}, "follow_links", "less than or equal to 2"),
        (GOOD | {"max_pages": 0}, "max_pages", "greater than or equal to 1"),
        (GOOD | {"max_pages": 51}, "max_pages", "at most 50 pages per run (SOURCE_MAX_PAGES)"),
        (GOOD | {"max_pages": 10**30}, "max_pages", "less than or equal to 500"),
        (GOOD | {"selectors": {"x": "p[["}}, "selectors", "not a valid CSS"),
        ({"url": "http://example.com/"}, "schedule", "field required"),
        (GOOD | {"colour": "red"}, "colour", "extra inputs"),
    ],
)
async def test_bad_sources_are_422_with_the_field(
    api: ApiClient, body: dict[str, Any], field: str, text: str
) -> None:
    response = await api.post("/sources", json=body)
    assert response.status == 422
    details = {d["field"]: d["message"] for d in (await response.json())["details"]}
    assert field in details and text.lower() in details[field].lower(), details


async def test_source_crud(api: ApiClient) -> None:
    created = await api.post("/sources", json=GOOD | {"selectors": {"h": "h1"}, "follow_links": 1})
    assert created.status == 201
    source = await created.json()
    assert created.headers["Location"] == f"/sources/{source['id']}"
    assert (source["schedule"], source["follow_links"], source["max_pages"]) == ("daily", 1, 20)
    assert (await (await api.get("/sources")).json())["sources"] == [source]
    assert await (await api.get(f"/sources/{source['id']}")).json() == source

    patched = await api.patch(f"/sources/{source['id']}", json={"schedule": "*/15 * * * *"})
    assert patched.status == 200
    body = await patched.json()
    assert body["schedule"] == "*/15 * * * *" and body["url"] == GOOD["url"]
    bad_patch = await api.patch(f"/sources/{source['id']}", json={"follow_links": 9})
    assert bad_patch.status == 422
    over_cap = await api.patch(f"/sources/{source['id']}", json={"max_pages": 200})
    assert over_cap.status == 422 and "SOURCE_MAX_PAGES" in await over_cap.text()

    assert (await api.delete(f"/sources/{source['id']}")).status == 204
    assert (await api.get(f"/sources/{source['id']}")).status == 404
    assert (await api.delete(f"/sources/{source['id']}")).status == 404


async def test_scheduled_crawl_follows_links_obeys_robots_and_counts_failures(
    api: ApiClient,
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    crawl_site: tuple[int, CrawlStats],
) -> None:
    port, stats = crawl_site
    url = f"http://127.0.0.1:{port}/news"
    body = {"url": url, "schedule": "hourly", "follow_links": 1, "max_pages": 10}
    source = await (await api.post("/sources", json=body)).json()
    settings = make_settings(scheduler_tick_seconds=1)
    worker, task = await start_worker(settings)
    try:

        async def crawled() -> bool:
            failures = await redis.hgetall(source_failures_key(source["id"]))  # type: ignore[misc]
            return await redis.zcard(DOC_INDEX_KEY) == 6 and bool(failures)

        await wait_for(crawled, timeout=30, what="the source's pages and its robots failure")
    finally:
        await stop_worker(worker, task)

    articles = [f"http://127.0.0.1:{port}/news/{n}" for n in range(1, 6)]
    for page in [url, *articles]:
        doc = await load_document(redis, document_id(page))
        assert doc is not None and doc.source_id == source["id"], page
    assert "/private/secret" not in stats.hits
    failures = await redis.hgetall(source_failures_key(source["id"]))  # type: ignore[misc]
    assert failures == {b"robots": b"1"}  # its typed reason (jobs.scrape.errors.FailureReason)
    listed = await (await api.get(f"/documents?source={source['id']}")).json()
    assert listed["total"] == 6
    assert {d["url"] for d in listed["items"]} == {url, *articles}
    detail = await (await api.get(f"/documents/{document_id(url)}")).json()
    assert detail["document"]["title"] == "News v1" and len(detail["versions"]) == 1


@pytest.mark.slow
async def test_two_workers_scrape_each_due_source_once_per_period(
    api: ApiClient,
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    crawl_site: tuple[int, CrawlStats],
    fault_report: Callable[[str], None],
) -> None:
    port, stats = crawl_site
    sources = []
    for n in range(3):
        body = {"url": f"http://127.0.0.1:{port}/plain/{n}", "schedule": "* * * * *"}
        sources.append(await (await api.post("/sources", json=body)).json())
    settings = make_settings(scheduler_tick_seconds=1)
    workers = [await start_worker(settings), await start_worker(settings)]
    try:

        async def ticked_enough() -> bool:
            runs = await redis.hget(TICK_KEY, "runs")  # type: ignore[misc]
            return runs is not None and int(runs) >= 5 and await redis.zcard(DOC_INDEX_KEY) == 3

        await wait_for(ticked_enough, timeout=30, what="5 scheduler ticks and 3 documents")
    finally:
        for worker, task in workers:
            await stop_worker(worker, task)

    ticks = int(await redis.hget(TICK_KEY, "runs"))  # type: ignore[misc]
    periods = {}
    for n, source in enumerate(sources):
        markers = [
            k async for k in redis.scan_iter(match=source_run_key(source["id"], 0)[:-1] + "*")
        ]
        periods[n] = len(markers)
        assert stats.hits[f"/plain/{n}"] == len(markers), (n, stats.hits, markers)
        assert 1 <= len(markers) <= 2  # the run may straddle a minute boundary
    fault_report(
        f"cron uniqueness: 2 workers, {ticks} ticks, 3 sources -> page fetches "
        f"{[stats.hits[f'/plain/{n}'] for n in range(3)]} for periods {list(periods.values())}"
    )


async def test_a_start_page_that_did_not_change_still_has_its_links_followed(
    make_ctx: Callable[..., Ctx], redis: ArqRedis, crawl_site: tuple[int, CrawlStats]
) -> None:
    """Next period the server answers 304 for /news: no new version, but the links stored with
    the page are followed again, so the run still reaches the articles."""
    port, stats = crawl_site
    spec = SourceSpec(url=f"http://127.0.0.1:{port}/news", schedule="hourly", follow_links=1)
    source = await create_source(redis, spec)
    ctx = make_ctx(job_id="test", scheduler_tick_seconds=1)
    first = await scrape_source(ctx, source_id=source.id, period=1)
    second = await scrape_source(ctx, source_id=source.id, period=2)
    assert (first["status"], second["status"], second["changed"]) == (200, 304, False)
    assert first["followed"] == second["followed"] == 6  # /news/1-5 and /private (robots later)
    queued = {m.decode() for m in await redis.zrange("arq:queue", 0, -1)}
    for n in range(1, 6):
        link = f"http://127.0.0.1:{port}/news/{n}"
        assert {source_job_id(source.id, 1, link), source_job_id(source.id, 2, link)} <= queued
    assert stats.hits["/news"] == 2


async def test_a_source_keeps_pages_it_reaches_unchanged_or_not_modified(
    make_ctx: Callable[..., Ctx],
    api: ApiClient,
    redis: ArqRedis,
    crawl_site: tuple[int, CrawlStats],
) -> None:
    """Pages stored before (here by plain scrapes) and found the same by a source's run, one
    by a 304 (/news has an ETag), one by the same content (/plain/1 has none), belong to the
    source; and a document can belong to two sources. Both were missing from the source."""
    port, stats = crawl_site
    news, plain = f"http://127.0.0.1:{port}/news", f"http://127.0.0.1:{port}/plain/1"
    ctx = make_ctx(job_id="test")
    for url in (news, plain):
        await scrape_page(ctx, {"url": url})
    sources = [
        await create_source(redis, SourceSpec(url=url, schedule="hourly"))
        for url in (news, plain, plain)
    ]
    results = [await scrape_source(ctx, source_id=s.id, period=1) for s in sources]
    assert [r["status"] for r in results] == [304, 200, 200]
    assert [r.get("changed") for r in results] == [False, False, False]
    for source, url in zip(sources, (news, plain, plain), strict=True):
        listed = await (await api.get(f"/documents?source={source.id}")).json()
        assert [d["url"] for d in listed["items"]] == [url], (source.id, listed)
    doc = await load_document(redis, document_id(plain))
    assert doc is not None and doc.source_id == sources[1].id  # the first source that has it
    assert stats.hits["/news"] == 2


@pytest.mark.parametrize("max_pages", [1, 4, 9])
async def test_a_run_fetches_exactly_its_budget_of_distinct_pages(
    make_ctx: Callable[..., Ctx],
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    crawl_site: tuple[int, CrawlStats],
    max_pages: int,
) -> None:
    """Links with repeats, a cycle back to the start page and self-links: a run of max_pages N
    fetches exactly N distinct pages, each once, the start page included (it used to be
    fetched twice, and places taken by repeats were not given back)."""
    port, stats = crawl_site
    spec = SourceSpec(url=f"http://127.0.0.1:{port}/cycle/0", schedule="hourly",
                      follow_links=2, max_pages=max_pages)  # fmt: skip
    source = await create_source(redis, spec)
    ctx = make_ctx(job_id="test")
    await scrape_source(ctx, source_id=source.id, period=1)
    worker, task = await start_worker(make_settings(), cron_jobs=[])
    try:

        async def run_done() -> bool:  # every page job of the run finished
            return await redis.zcard("arq:queue") == 0 and not worker.tasks

        await wait_for(run_done, what="the source's run")
    finally:
        await stop_worker(worker, task)
    pages = {path: hits for path, hits in stats.hits.items() if path.startswith("/cycle/")}
    assert len(pages) == max_pages, pages
    assert set(pages.values()) == {1}, pages  # each page once, the start page included
