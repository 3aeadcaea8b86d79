"""Batches: the jobs of one multi-URL `POST /jobs/scrape` under one id, and their progress."""

from __future__ import annotations

import json
from collections import Counter

from aiohttp import web
from redis.asyncio import Redis

from app.http import json_model, status_url
from app.jobstatus import read_jobs
from app.schemas import ScrapeAccepted, ScrapeBatch, ScrapeBatchJob
from app.state import REDIS, SETTINGS
from asyncjobs.jobstate import FINISHED
from asyncjobs.keys import HEX_ID_PATTERN, SCRAPE_BATCH_KEY_PREFIX

BATCH_TTL_S = 24 * 3600
BATCH_ID_PATTERN = HEX_ID_PATTERN


async def save_batch(redis: Redis, batch_id: str, jobs: list[ScrapeAccepted]) -> None:
    entries = [{"job_id": job.job_id, "url": job.url} for job in jobs]
    await redis.set(SCRAPE_BATCH_KEY_PREFIX + batch_id, json.dumps(entries), ex=BATCH_TTL_S)


def batch_url(request: web.Request, batch_id: str) -> str:
    return str(request.app.router["scrape_batch"].url_for(batch_id=batch_id))


async def show_batch(request: web.Request) -> web.Response:
    redis = request.app[REDIS]
    batch_id = request.match_info["batch_id"]
    raw = await redis.get(SCRAPE_BATCH_KEY_PREFIX + batch_id)
    if raw is None:
        raise web.HTTPNotFound(text=f"no batch {batch_id} (batches are kept for 24 hours)")
    entries: list[dict[str, str]] = json.loads(raw)
    queue = request.app[SETTINGS].queue_name
    views = await read_jobs(redis, queue, [entry["job_id"] for entry in entries])
    jobs = [
        ScrapeBatchJob(
            job_id=view.job_id,
            url=entry["url"],
            status=view.status,
            status_url=status_url(request, view.job_id),
        )
        for entry, view in zip(entries, views, strict=True)
    ]
    by_status = Counter(job.status for job in jobs)
    batch = ScrapeBatch(
        batch_id=batch_id,
        total=len(jobs),
        finished=sum(n for status, n in by_status.items() if status in FINISHED),
        by_status=dict(sorted(by_status.items())),
        jobs=jobs,
    )
    return json_model(batch)


def add_batch_routes(app: web.Application) -> None:
    app.router.add_get(f"/batches/{{batch_id:{BATCH_ID_PATTERN}}}", show_batch, name="scrape_batch")
