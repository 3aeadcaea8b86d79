"""Scrape jobs against a real HTML site on loopback: summaries, saved documents, failures."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

import pytest
from arq.connections import ArqRedis

from asyncjobs.errors import PermanentJobError, TransientJobError
from jobs.scrape.documents import document_id, load_document
from jobs.scrape.page import scrape_page
from tests.conftest import Ctx
from tests.servers import SiteStats


@pytest.fixture
async def ctx(make_ctx: Callable[..., Ctx]) -> Ctx:
    """The same context the worker's startup builds, so the job function runs for real."""
    return make_ctx()


async def test_scrape_returns_summary_and_saves_document(
    ctx: Ctx, site: tuple[str, SiteStats], redis: ArqRedis
) -> None:
    base, _ = site
    url = f"{base}/page/1"
    result = await scrape_page(ctx, {"url": url, "selectors": {"lead": "p.lead", "h": "h1"}})
    assert result["status"] == 200
    assert result["final_url"] == url
    assert result["title"] == "Test page 1"
    assert result["description"] == "A page for tests"
    assert result["links_count"] == 3
    assert result["extracted"] == {"lead": ["Lead paragraph"], "h": ["Headline 1"]}
    # script and style contents are not text
    assert result["text_length"] == len("Headline 1 Lead paragraph A B C")

    saved = await load_document(redis, document_id(url))
    assert saved is not None
    assert result["document_id"] == document_id(url)
    assert saved.text == "Headline 1 Lead paragraph A B C"
    assert saved.title == "Test page 1"
    assert saved.fetched_at.isoformat() == result["fetched_at"].replace("Z", "+00:00")
    assert await redis.zscore("asyncjobs:docs", document_id(url)) is not None


async def test_redirect_is_followed_and_final_url_reported(
    ctx: Ctx, site: tuple[str, SiteStats]
) -> None:
    base, _ = site
    result = await scrape_page(ctx, {"url": f"{base}/redirect"})
    assert result["final_url"] == f"{base}/page/redirected"
    assert result["title"] == "Test page redirected"


async def test_slow_page_times_out(
    make_ctx: Callable[..., Ctx], site: tuple[str, SiteStats]
) -> None:
    ctx = make_ctx(scrape_timeout=0.3)
    with pytest.raises(TransientJobError, match=r"timed out after 0.3s"):
        await scrape_page(ctx, {"url": f"{site[0]}/slow?ms=3000"})


async def test_huge_page_is_cut_off_at_the_size_cap(
    make_ctx: Callable[..., Ctx], redis: ArqRedis, site: tuple[str, SiteStats]
) -> None:
    ctx = make_ctx(scrape_max_bytes=100_000)
    with pytest.raises(PermanentJobError, match="larger than the 100000 byte limit"):
        await scrape_page(ctx, {"url": f"{site[0]}/huge"})
    assert await redis.zcard("asyncjobs:docs") == 0


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("/loop", PermanentJobError, "more than 5 redirects"),
        ("/error", TransientJobError, "HTTP 500"),
        ("/missing", PermanentJobError, "HTTP 404"),
        ("/json", PermanentJobError, r"not an HTML page \(Content-Type: application/json\)"),
    ],
)
async def test_bad_pages_fail_with_a_clear_error(
    ctx: Ctx,
    site: tuple[str, SiteStats],
    path: str,
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        await scrape_page(ctx, {"url": site[0] + path})


async def test_redirect_loop_stops_after_the_limit(ctx: Ctx, site: tuple[str, SiteStats]) -> None:
    base, stats = site
    with pytest.raises(PermanentJobError):
        await scrape_page(ctx, {"url": f"{base}/loop"})
    assert stats.hits["/loop"] == 6  # the first request and 5 redirects


async def test_connection_refused_is_transient(ctx: Ctx) -> None:
    from tests.helpers import free_port

    with pytest.raises(TransientJobError, match="could not connect"):
        await scrape_page(ctx, {"url": f"http://127.0.0.1:{free_port()}/"})


@pytest.mark.parametrize(
    "location",
    ["http://exa mple.com/", "http://[::1/", "http://:80/", "ftp://example.com/file"],
    ids=["space", "broken-ipv6", "no-host", "not-http"],
)
async def test_a_redirect_to_an_invalid_url_fails_for_good(
    ctx: Ctx, site: tuple[str, SiteStats], location: str
) -> None:
    """It used to end in a connection error, retried as transient."""
    base, stats = site
    with pytest.raises(PermanentJobError, match="redirect to an invalid URL"):
        await scrape_page(ctx, {"url": f"{base}/redirect-to?to={quote(location, safe='')}"})
    assert stats.hits["redirect-to"] == 1
