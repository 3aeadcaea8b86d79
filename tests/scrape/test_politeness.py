"""Politeness against a real loopback site: robots.txt, per-host limits and delays, conditional
requests and change detection."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import pytest
from arq.connections import ArqRedis

from asyncjobs.errors import PermanentJobError, Postpone
from asyncjobs.keys import HOST_KEY_PREFIX
from asyncjobs.settings import Settings
from jobs.scrape.documents import document_id, load_document, load_versions
from jobs.scrape.page import scrape_page
from jobs.scrape.politeness import BUSY_RETRY_MS, WAIT_IN_PLACE_S, WAKE_EARLY_S, Politeness
from tests.conftest import Ctx
from tests.servers import CrawlStats


async def test_robots_txt_is_obeyed_and_cached(
    make_ctx: Callable[..., Ctx], crawl_site: tuple[int, CrawlStats]
) -> None:
    port, stats = crawl_site
    ctx = make_ctx()
    with pytest.raises(PermanentJobError, match=r"disallowed by robots\.txt"):
        await scrape_page(ctx, {"url": f"http://127.0.0.1:{port}/private/secret"})
    await scrape_page(ctx, {"url": f"http://127.0.0.1:{port}/plain/1"})
    assert "/private/secret" not in stats.hits
    assert stats.hits["/robots.txt"] == 1  # fetched once, then cached in Redis
    assert stats.hits["/plain/1"] == 1


async def test_per_host_concurrency_limit_is_never_exceeded(
    make_ctx: Callable[..., Ctx],
    crawl_site: tuple[int, CrawlStats],
    fault_report: Callable[[str], None],
) -> None:
    """12 pages on each of two hosts at once, limit 2 per host: each host sees at most 2."""
    port, stats = crawl_site
    ctx = make_ctx(scrape_per_host_concurrency=2, scrape_min_host_delay=0)
    urls = [
        f"http://{host}:{port}/news/{n}" for host in ("127.0.0.1", "localhost") for n in range(12)
    ]
    await asyncio.gather(*(scrape_page(ctx, {"url": url}) for url in urls))
    fault_report(
        f"politeness: max concurrent requests per host observed {stats.max_in_flight} (limit 2)"
    )
    assert stats.max_in_flight == {"127.0.0.1": 2, "localhost": 2}


async def test_minimum_delay_between_requests_to_a_host(
    make_ctx: Callable[..., Ctx], crawl_site: tuple[int, CrawlStats]
) -> None:
    port, stats = crawl_site
    ctx = make_ctx(scrape_per_host_concurrency=5, scrape_min_host_delay=0.15)
    urls = [f"http://127.0.0.1:{port}/plain/{n}" for n in range(5)]
    await asyncio.gather(*(scrape_page(ctx, {"url": url}) for url in urls))
    starts = sorted(stats.starts["127.0.0.1"])
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(starts) == 6  # robots.txt and 5 pages
    assert min(gaps) >= 0.14, gaps


async def test_conditional_requests_and_change_detection(
    make_ctx: Callable[..., Ctx], crawl_site: tuple[int, CrawlStats], redis: ArqRedis
) -> None:
    port, stats = crawl_site
    ctx = make_ctx()
    url = f"http://127.0.0.1:{port}/news"
    first = await scrape_page(ctx, {"url": url})
    assert first["changed"] is True
    second = await scrape_page(ctx, {"url": url})
    # a 304 answers with the stored summary, the same as the first fetch's but for the fetch
    fetch = {"status", "changed", "fetched_at", "fetch_ms", "queued_for_host_ms"}
    assert second == {k: v for k, v in first.items() if k not in fetch} | {
        "status": 304, "changed": False, "fetched_at": second["fetched_at"],
        "fetch_ms": second["fetch_ms"], "queued_for_host_ms": 0}  # fmt: skip
    assert stats.headers["/news"][1]["If-None-Match"] == '"v1"'
    assert len(await load_versions(redis, document_id(url))) == 1

    stats.version = 2  # the page changes
    third = await scrape_page(ctx, {"url": url})
    assert third["changed"] is True and third["title"] == "News v2"
    versions = await load_versions(redis, document_id(url))
    assert [v.title for v in versions] == ["News v2", "News v1"]
    doc = await load_document(redis, document_id(url))
    assert doc is not None and doc.etag == '"v2"' and doc.versions == 2


async def test_same_content_without_etag_makes_no_new_version(
    make_ctx: Callable[..., Ctx], crawl_site: tuple[int, CrawlStats], redis: ArqRedis
) -> None:
    port, _ = crawl_site
    ctx = make_ctx()
    url = f"http://127.0.0.1:{port}/plain/7"
    assert (await scrape_page(ctx, {"url": url}))["changed"] is True
    before = await load_document(redis, document_id(url))
    again = await scrape_page(ctx, {"url": url})
    assert again["changed"] is False
    after = await load_document(redis, document_id(url))
    assert before is not None and after is not None
    assert after.versions == 1 and after.changed_at == before.changed_at
    assert after.fetched_at > before.fetched_at


async def test_no_limits_means_no_politeness_bookkeeping(
    make_ctx: Callable[..., Ctx], crawl_site: tuple[int, CrawlStats], redis: ArqRedis
) -> None:
    ctx = make_ctx(scrape_per_host_concurrency=0, scrape_min_host_delay=0)
    assert ctx.fetcher.politeness is None
    port, stats = crawl_site
    await scrape_page(ctx, {"url": f"http://127.0.0.1:{port}/plain/1"})
    assert stats.hits["/plain/1"] == 1
    assert [k async for k in redis.scan_iter(match="asyncjobs:host:*")] == []


async def test_a_turn_due_while_the_host_is_full_is_postponed_and_keeps_its_wait(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    """Host limit 1: job B's turn comes while A still holds the host's only slot (a slow page);
    B waits in place briefly, then gives its worker slot back (Postpone) with a new turn. Once
    A is done, B gets the slot, and its reported wait spans both runs."""
    politeness = Politeness(
        redis, make_settings(scrape_per_host_concurrency=1, scrape_min_host_delay=0.2)
    )
    loop = asyncio.get_running_loop()
    async with politeness.slot("slow.test", waiter="job-a") as a_wait:
        assert a_wait.queued_s == 0
        first_try = loop.time()
        with pytest.raises(Postpone) as postponed:
            async with politeness.slot("slow.test", waiter="job-b"):
                raise AssertionError("the host's only slot is taken")
        in_place = loop.time() - first_try
        assert WAIT_IN_PLACE_S * 0.9 <= in_place <= WAIT_IN_PLACE_S + 0.5  # bounded, then gave up
        assert postponed.value.delay >= BUSY_RETRY_MS / 1000 - WAKE_EARLY_S - 0.05
        assert await redis.exists(f"{HOST_KEY_PREFIX}slow.test:turn:job-b")
    await asyncio.sleep(postponed.value.delay)
    async with politeness.slot("slow.test", waiter="job-b") as b_wait:
        assert b_wait.queued_s >= loop.time() - first_try - 0.05  # both runs' wait, not this one's
    assert not await redis.exists(f"{HOST_KEY_PREFIX}slow.test:turn:job-b")  # used up
