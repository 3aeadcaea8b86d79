"""The scrape job: fetch one page (jobs.scrape.fetch), summarize it, save it."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from pydantic import AfterValidator, AnyHttpUrl, BaseModel, ConfigDict, Field

from asyncjobs.errors import JobError
from jobs.context import WorkerContext
from jobs.retry import builtin, report
from jobs.scrape.documents import (
    DocumentSnapshot,
    content_hash,
    document_id,
    previous_validators,
    record_unchanged,
    save_document,
    stored_links,
)
from jobs.scrape.encoding import decode_page
from jobs.scrape.html import is_valid_selector, select, summarize_html
from jobs.values import now_utc

MAX_URL_LENGTH = 2048
MAX_SELECTORS = 50
# Parsing a big page takes long enough to stall other jobs in the loop: do it in a thread.
PARSE_IN_THREAD_BYTES = 256 * 1024


def check_selectors(selectors: dict[str, str]) -> dict[str, str]:
    for name, css in selectors.items():
        if not 1 <= len(name) <= 64:
            raise ValueError(f"selector name {name!r} must be 1 to 64 characters")
        if len(css) > 512 or not is_valid_selector(css):
            raise ValueError(f"selector {name!r} is not a valid CSS selector: {css!r}")
    return selectors


# Named CSS selectors whose matches a scrape job extracts: {"headline": "h1", ...}.
Selectors = Annotated[
    dict[str, str], Field(max_length=MAX_SELECTORS), AfterValidator(check_selectors)
]


class ScrapeTarget(BaseModel):
    """The argument of one scrape job."""

    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl = Field(max_length=MAX_URL_LENGTH)
    selectors: Selectors = Field(default_factory=dict)


@builtin(
    "scrape",
    "scrape",
    priority="transactional",
    endpoint="scrape",
    schedulable=True,
    shown=("target.url",),
)
async def scrape(ctx: WorkerContext, target: dict[str, Any]) -> dict[str, Any]:
    """arq job: fetch, summarize and save one page; returns the summary."""
    return await scrape_page(ctx, target)


async def scrape_page(ctx: WorkerContext, target: dict[str, Any]) -> dict[str, Any]:
    """Fetch, summarize and save one page with the worker's shared clients in `ctx`."""
    spec = ScrapeTarget.model_validate(target)
    result, _ = await scrape_url(ctx, str(spec.url), spec.selectors)
    return result


async def scrape_url(
    ctx: WorkerContext, url: str, selectors: dict[str, str], source_id: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Fetch (conditionally, if the URL was seen before), summarize and save `url`.

    Returns the job result and the page's links (the stored ones when the server says 304)."""
    settings, redis, fetcher = ctx.settings, ctx.redis, ctx.fetcher
    doc_id = document_id(url)
    etag, last_modified = await previous_validators(redis, url)
    monitor = ctx.monitor
    try:
        page = await fetcher.fetch_page(url, etag, last_modified, waiter=ctx.waiter)
    except JobError:
        if monitor:
            monitor.count("pages_scraped", "error")
        raise
    if monitor:
        monitor.count("pages_scraped", f"{page.status // 100}xx")
    fetch_ms, queued_ms = page.fetch_ms, page.queued_for_host_ms
    if page.not_modified:
        await record_unchanged(redis, url, now_utc(), fetch_ms, etag=page.etag,
                               last_modified=page.last_modified, source_id=source_id)  # fmt: skip
        report(f"scraped {url} -> 304 not modified ({fetch_ms:.0f} ms)", url=url, status=304)
        result = {"document_id": doc_id, "url": url, "status": 304, "changed": False,
                  "fetch_ms": fetch_ms, "queued_for_host_ms": queued_ms}  # fmt: skip
        return result, await stored_links(redis, url)  # the page is the same: so are its links
    html, encoding = decode_page(page.body, page.charset)
    if len(page.body) > PARSE_IN_THREAD_BYTES:
        summary = await asyncio.to_thread(summarize_html, html)
    else:
        summary = summarize_html(html)
    if selectors:
        summary.extracted = await ctx.run_cpu("the CSS selectors", select, html, selectors)
    snapshot = DocumentSnapshot(
        url=url,
        final_url=page.final_url,
        status=page.status,
        content_type=page.content_type,
        encoding=encoding,
        title=summary.title,
        description=summary.description,
        links_count=summary.links_count,
        text_length=len(summary.text),
        text=summary.text[: settings.scrape_text_max_chars],
        content_hash=content_hash(summary.text),
        extracted=summary.extracted,
        fetched_at=now_utc(),
        fetch_ms=fetch_ms,
        source_id=source_id,
        etag=page.etag,
        last_modified=page.last_modified,
    )
    changed = await save_document(redis, snapshot, settings.scrape_keep_versions, summary.links)
    report(
        f"scraped {url} -> {page.status} ({len(summary.text)} chars, {fetch_ms:.0f} ms, "
        f"{'changed' if changed else 'unchanged'})",
        url=url, status=page.status,
    )  # fmt: skip
    result = {
        "document_id": doc_id,
        "changed": changed,
        **snapshot.model_dump(
            mode="json", exclude={"text", "content_type", "etag", "last_modified", "source_id"}
        ),
        "queued_for_host_ms": queued_ms,
    }
    return result, summary.links
