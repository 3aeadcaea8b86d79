"""The banner every dashboard page shows when jobs wait and no worker is consuming: no live
worker heartbeat (each worker refreshes its registry hash every second, with a 15 s TTL; see
jobs/engine/monitor.py) while the queue holds due jobs.

A middleware reads it (one pipelined round trip, two when jobs are due) before the handler, so
`render` (views.py) can put it in every page's context; templates/_worker_banner.html shows it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiohttp import web
from redis.asyncio import Redis

from app.dashboard.session import SESSION, STATIC_PREFIX
from app.errors import Handler
from app.state import REDIS, SETTINGS
from asyncjobs.keys import WORKER_KEY_PREFIX, WORKERS_KEY
from jobs.values import as_text


@dataclass(frozen=True)
class NoWorker:
    queued: int  # jobs due now
    oldest_s: float  # how long the oldest of them has waited


WORKER_BANNER = web.RequestKey("worker_banner", NoWorker)  # set only when the banner is due


async def no_worker(redis: Redis, queue_name: str, now: float) -> NoWorker | None:
    """NoWorker when jobs are due and no worker's heartbeat is alive; else None."""
    now_ms = int(now * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcount(queue_name, "-inf", now_ms)
        pipe.zrangebyscore(queue_name, "-inf", now_ms, start=0, num=1, withscores=True)
        pipe.smembers(WORKERS_KEY)
        queued, oldest, worker_ids = await pipe.execute()
    if not queued:
        return None
    if worker_ids:
        keys = [WORKER_KEY_PREFIX + as_text(i) for i in worker_ids]
        if await redis.exists(*keys):
            return None
    oldest_s = max(0.0, (now_ms - oldest[0][1]) / 1000) if oldest else 0.0
    return NoWorker(queued=int(queued), oldest_s=oldest_s)


@web.middleware
async def worker_banner(request: web.Request, handler: Handler) -> web.StreamResponse:
    """For a signed-in page load: not static files, not a job's event stream."""
    wanted = (
        request.method == "GET"
        and request.get(SESSION) is not None
        and not request.path.startswith(STATIC_PREFIX)
        and "text/event-stream" not in request.headers.get("Accept", "")
    )
    if wanted:
        queue_name = request.config_dict[SETTINGS].queue_name
        banner = await no_worker(request.config_dict[REDIS], queue_name, time.time())
        if banner is not None:
            request[WORKER_BANNER] = banner
    return await handler(request)
