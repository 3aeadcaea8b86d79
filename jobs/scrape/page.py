"""The scrape job: fetch one page (jobs.scrape.fetch), summarize it, save it."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, TypeAdapter
from yarl import URL

from asyncjobs.errors import JobError
from jobs.context import WorkerContext
from jobs.retry import builtin, report
from jobs.scrape.documents import (
    DocumentSnapshot,
    PreviousFetch,
    content_hash,
    document_id,
    previous_fetch,
    record_unchanged,
    save_document,
    stored_summary,
)
from jobs.scrape.encoding import decode_page
from jobs.scrape.errors import (
    FailureReason,
    ScrapeFailed,
    count_failure,
    last_failure,
    noting_failure,
)
from jobs.scrape.fetch import FetchedPage
from jobs.scrape.html import (
    MAX_EXTRACTED_CHARS,
    MAX_LINKS,
    PageSummary,
    absolute_links,
    select,
    summarize_html,
)
from jobs.scrape.selectors import Selectors, SelectorSpec, selectors_digest
from jobs.values import now_utc

MAX_URL_LENGTH = 2048
# Parsing a big page takes long enough to stall other jobs in the loop: do it in a thread.
PARSE_IN_THREAD_BYTES = 256 * 1024
MAX_RESULT_LINKS = 200  # of a page's links in the job's result (MAX_LINKS are followed)
_TIME = TypeAdapter(datetime)  # a time as the 200 path's results write it (pydantic's JSON)


class ScrapeTarget(BaseModel):
    """The argument of one scrape job."""

    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl = Field(max_length=MAX_URL_LENGTH)
    selectors: Selectors = Field(default_factory=dict)
    force: bool = Field(False, description="fetch unconditionally (no If-None-Match)")


async def _failed_for_good(ctx: WorkerContext, kwargs: dict[str, Any]) -> None:
    """The dead-letter hook: an ad-hoc scrape's failure counts once, by its reason."""
    await count_failure(ctx.redis, None, last_failure())


@builtin(
    "scrape",
    "scrape",
    priority="transactional",
    endpoint="scrape",
    schedulable=True,
    shown=("target.url",),
    on_dead_letter=_failed_for_good,
)
async def scrape(ctx: WorkerContext, target: dict[str, Any]) -> dict[str, Any]:
    """arq job: fetch, summarize and save one page; returns the summary."""
    with noting_failure():
        return await scrape_page(ctx, target)


async def scrape_page(ctx: WorkerContext, target: dict[str, Any]) -> dict[str, Any]:
    """Fetch, summarize and save one page with the worker's shared clients in `ctx`."""
    spec = ScrapeTarget.model_validate(target)
    result, _ = await scrape_url(ctx, str(spec.url), spec.selectors, force=spec.force)
    return result


async def scrape_url(
    ctx: WorkerContext,
    url: str,
    selectors: dict[str, SelectorSpec],
    source_id: str | None = None,
    force: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """Fetch, summarize and save `url`: conditionally when it was seen before, unless
    `force`, or the stored extraction was made with other selectors than these (a 304 would
    leave them unapplied).

    Returns the job result and the page's links (the stored ones when the server says 304)."""
    digest = selectors_digest(selectors)
    previous = await previous_fetch(ctx.redis, url)
    conditional = not force and (not selectors or previous.selectors_digest == digest)
    page = await _fetch(ctx, url, previous if conditional else PreviousFetch())
    if page.not_modified:
        return await _not_modified(ctx, url, page, bool(selectors), source_id)
    return await _save_page(ctx, url, page, selectors, digest, source_id)


async def _fetch(ctx: WorkerContext, url: str, previous: PreviousFetch) -> FetchedPage:
    monitor = ctx.monitor
    try:
        page = await ctx.fetcher.fetch_page(
            url, previous.etag, previous.last_modified, waiter=ctx.waiter
        )
    except JobError:
        if monitor:
            monitor.count("pages_scraped", "error")
        raise
    if monitor:
        monitor.count("pages_scraped", f"{page.status // 100}xx")
    return page


async def _not_modified(
    ctx: WorkerContext, url: str, page: FetchedPage, extracting: bool, source_id: str | None
) -> tuple[dict[str, Any], list[str]]:
    """A 304: the stored snapshot stands; the result is its summary (its extraction was made
    with these selectors, or there are none), and its links are followed again."""
    redis, fetch_ms, fetched_at = ctx.redis, page.fetch_ms, now_utc()
    await record_unchanged(redis, url, fetched_at, fetch_ms, etag=page.etag,
                           last_modified=page.last_modified, source_id=source_id)  # fmt: skip
    report(f"scraped {url} -> 304 not modified ({fetch_ms:.0f} ms)", url=url, status=304)
    stored = await stored_summary(redis, url)
    base = stored.pop("links_base", None) or stored.get("final_url") or url  # older: no base
    links = absolute_links(URL(base), stored.pop("links", []), MAX_LINKS)
    if not extracting:
        stored["extracted"] = {}
    result = {"document_id": document_id(url), "url": url, **stored, "status": 304,
              "changed": False, "links": links[:MAX_RESULT_LINKS],
              "fetched_at": _TIME.dump_python(fetched_at, mode="json"), "fetch_ms": fetch_ms,
              "queued_for_host_ms": page.queued_for_host_ms}  # fmt: skip
    return result, links


async def _summarize(html: str, url: str, size: int) -> PageSummary:
    if size > PARSE_IN_THREAD_BYTES:
        return await asyncio.to_thread(summarize_html, html, url)
    return summarize_html(html, url)


async def _extract(
    ctx: WorkerContext, html: str, url: str, selectors: dict[str, SelectorSpec]
) -> dict[str, Any]:
    if not selectors:
        return {}
    extraction = await ctx.run_cpu("the CSS selectors", select, html, selectors, url)
    if extraction.over_limit:
        raise ScrapeFailed(
            FailureReason.SELECTOR_LIMIT,
            f"the selectors matched more than {MAX_EXTRACTED_CHARS} characters: narrow them",
        )
    return extraction.values


async def _save_page(
    ctx: WorkerContext,
    url: str,
    page: FetchedPage,
    selectors: dict[str, SelectorSpec],
    digest: str,
    source_id: str | None,
) -> tuple[dict[str, Any], list[str]]:
    settings, redis = ctx.settings, ctx.redis
    doc_id = document_id(url)
    fetch_ms, queued_ms = page.fetch_ms, page.queued_for_host_ms
    html, encoding = decode_page(page.body, page.charset)
    summary = await _summarize(html, page.final_url, len(page.body))
    summary.extracted = await _extract(ctx, html, page.final_url, selectors)
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
        metadata=summary.metadata,
        fetched_at=now_utc(),
        fetch_ms=fetch_ms,
        source_id=source_id,
        etag=page.etag,
        last_modified=page.last_modified,
        selectors_digest=digest,
    )
    changed = await save_document(
        redis, snapshot, settings.scrape_keep_versions, summary.hrefs, summary.base
    )
    report(
        f"scraped {url} -> {page.status} ({len(summary.text)} chars, {fetch_ms:.0f} ms, "
        f"{'changed' if changed else 'unchanged'})",
        url=url, status=page.status,
    )  # fmt: skip
    result = {
        "document_id": doc_id,
        "changed": changed,
        **snapshot.model_dump(mode="json", exclude=NOT_IN_RESULT),
        "links": summary.links[:MAX_RESULT_LINKS],
        "queued_for_host_ms": queued_ms,
    }
    return result, summary.links


NOT_IN_RESULT = {"text", "content_type", "etag", "last_modified", "source_id", "selectors_digest"}
