"""Scheduled scraping: a cron tick enqueues each due source once per period; a source's scrape
follows same-host links to the depth and page budget the source allows. Each run, scheduled or
manual, is recorded with its pages' outcomes (jobs.scrape.runs)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from yarl import URL

from asyncjobs.keys import CRON_KEY_PREFIX, source_pages_key, source_run_key, source_seen_key
from jobs.context import WorkerContext
from jobs.enqueue import enqueue_registered
from jobs.retry import builtin, classified
from jobs.scrape.errors import count_failure, last_failure, noting_failure
from jobs.scrape.page import scrape_url
from jobs.scrape.runs import (
    FAILED,
    add_pending,
    finish_page,
    page_outcome,
    source_job_id,
    start_run,
)
from jobs.scrape.sources import Source, get_source, list_sources, period_length, period_start
from jobs.values import now_utc

__all__ = ["TICK_KEY", "schedule_sources", "scrape_source", "source_job_id"]

log = logging.getLogger(__name__)

TICK_KEY = CRON_KEY_PREFIX + "schedule_sources"  # the monitor's record: last_run, runs

RUN_KEYS_TTL_S = 2 * 24 * 3600


@classified("maintenance")
async def schedule_sources(ctx: WorkerContext) -> dict[str, Any]:
    """Cron tick: enqueue the scrape of every source whose current period has not run yet.

    The job id is derived from (source, period), so however many workers tick at once, arq
    accepts one job per period; the run marker (kept for the whole period) stops a later tick
    from enqueueing it again after arq has forgotten the finished job."""
    redis = ctx.redis
    now = now_utc()
    enqueued = []
    for source in await list_sources(redis):
        start = period_start(source.schedule, now)
        period = int(start.timestamp())
        if await redis.exists(source_run_key(source.id, period)):
            continue
        await start_run(redis, source.id, period, "schedule")  # before its job can end
        job = await enqueue_registered(
            redis, ctx.settings, "scrape_source", {"source_id": source.id, "period": period},
            job_id=source_job_id(source.id, period),
        )  # fmt: skip
        ttl = period_length(source.schedule, start) + timedelta(days=1)
        await redis.set(source_run_key(source.id, period), "1", ex=ttl)
        if job is not None:
            enqueued.append(source.id)
    if enqueued:
        log.info("scheduled %d due source(s): %s", len(enqueued), ", ".join(enqueued))
    return {"enqueued": enqueued}


async def _page_failed_for_good(ctx: WorkerContext, kwargs: dict[str, Any]) -> None:
    """The dead-letter hook (after the last try, or a permanent error): the failure counts
    once, by its reason, for the source and in its run."""
    reason = last_failure()
    source_id, period = kwargs.get("source_id"), kwargs.get("period")
    if not isinstance(source_id, str):
        return
    await count_failure(ctx.redis, source_id, reason)
    if isinstance(period, int):
        await finish_page(ctx.redis, source_id, period, ctx.job_id, FAILED + reason.value)


@builtin(
    "scrape_source", "scrape", shown=("source_id", "url"), on_dead_letter=_page_failed_for_good
)
async def scrape_source(
    ctx: WorkerContext,
    source_id: str,
    period: int,
    url: str | None = None,
    depth: int = 0,
    force: bool = False,
) -> dict[str, Any]:
    """arq job: one page of a source's run (its start page, or a link found on the way);
    `force` (a run asked for it): fetched unconditionally, as the source's own `force`."""
    with noting_failure():
        source = await get_source(ctx.redis, source_id)
        if source is None:
            await finish_page(ctx.redis, source_id, period, ctx.job_id, "skipped")
            return {"skipped": "the source was deleted"}
        force = force or source.force
        target = url or source.url
        result, links = await scrape_url(ctx, target, source.selectors, source.id, force)
        if depth < source.follow_links and links:
            base = result.get("final_url") or target
            result["followed"] = await follow_links(
                ctx, source, period, base, links, depth, force=force
            )
        await finish_page(ctx.redis, source.id, period, ctx.job_id, page_outcome(result))
        return result


async def follow_links(
    ctx: WorkerContext,
    source: Source,
    period: int,
    base: str,
    links: list[str],
    depth: int,
    *,
    force: bool = False,
) -> int:
    """Enqueue same-host links within the run's page budget; each URL once per run."""
    settings = ctx.settings
    redis = ctx.redis
    budget = min(source.max_pages, settings.source_max_pages) - 1  # the start page counts
    start = str(URL(source.url).with_fragment(None))
    seen, taken = source_seen_key(source.id, period), source_pages_key(source.id, period)
    followed = 0
    for link in same_host_links(base, links, URL(source.url).host):
        # A link the run has already met takes no place in the budget (the start page is the
        # run's first job, under another id). Repeats used to take a place and give it back
        # later, so pages running at the same time found the budget full: 41 of 49 fetched.
        if link == start or not await redis.sadd(seen, link):  # type: ignore[misc]
            continue
        await redis.expire(seen, RUN_KEYS_TTL_S)
        if await redis.incr(taken) > budget:
            await redis.decr(taken)  # every place is taken by a distinct page: the run is full
            break
        await redis.expire(taken, RUN_KEYS_TTL_S)
        arguments: dict[str, Any] = {
            "source_id": source.id, "period": period, "url": link, "depth": depth + 1
        }  # fmt: skip
        if force:
            arguments["force"] = True
        job_id = source_job_id(source.id, period, link)
        await add_pending(redis, source.id, period, job_id)  # before: the job may end at once
        job = await enqueue_registered(redis, settings, "scrape_source", arguments, job_id=job_id)
        if job is not None:
            followed += 1
    return followed


def same_host_links(base: str, hrefs: list[str], host: str | None) -> list[str]:
    base_url = URL(base)
    seen: set[str] = {str(base_url)}
    result = []
    for href in hrefs:
        try:
            url = base_url.join(URL(href)).with_fragment(None)
        except ValueError:
            continue
        text = str(url)
        if url.scheme in ("http", "https") and url.host == host and text not in seen:
            seen.add(text)
            result.append(text)
    return result
