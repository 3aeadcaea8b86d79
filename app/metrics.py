"""`GET /metrics` in Prometheus text format.

Job metrics happen in worker processes; they reach this endpoint through Redis (see
jobs/engine/monitor.py: each worker adds its counts there once a second), so every web process
serves the same cluster-wide totals and a scrape of any one of them is enough. HTTP metrics are
per web process (each process counts its own requests), as Prometheus expects of a multi-process
server.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from redis.asyncio import Redis

from app.errors import Handler
from app.state import REDIS, SETTINGS
from asyncjobs.jobstate import JobState
from asyncjobs.keys import (
    COUNTERS_KEY,
    DEAD_INDEX_KEY,
    DURATION_KEY,
    LATENCY_KEY,
    RUNNING_KEY,
    WORKER_KEY_PREFIX,
    WORKERS_KEY,
    waiting_key,
)
from jobs.engine.dependencies import drop_expired_waiting
from jobs.engine.monitor import DURATION_BUCKETS
from jobs.engine.queue import waiting_counts
from jobs.schedules import list_schedules
from jobs.values import as_text

JOB_COUNTERS = {
    "enqueued": "Jobs enqueued",
    "started": "Job runs started (tries, and runs that postponed themselves)",
    "completed": "Jobs completed",
    "failed": "Jobs failed for good (dead-lettered)",
    "retried": "Job tries that ended in a retry",
    "postponed": "Job runs postponed without counting a try (a scrape waiting for its host)",
    "dead_lettered": "Jobs put in the dead-letter store",
    "cancelled": "Job tries cancelled (aborted, or cut by a shutdown)",
}


class HttpMetrics:
    """This web process's own request counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "asyncjobs_http_requests", "HTTP requests", ["method", "route", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "asyncjobs_http_request_duration_seconds", "HTTP request latency",
            ["method", "route"], registry=self.registry,
        )  # fmt: skip


HTTP_METRICS = web.AppKey("http_metrics", HttpMetrics)
UNPARSED = "unparsed"  # method and route of a request the HTTP parser refused


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        metrics = request.app[HTTP_METRICS]
        metrics.requests.labels(request.method, route, str(status)).inc()
        metrics.latency.labels(request.method, route).observe(time.perf_counter() - started)


def count_unparsed(app: web.Application, status: int) -> None:
    """A request aiohttp's HTTP parser refused (app/httperrors.py): no middleware saw it, and
    it has no method or route to label it with."""
    metrics = app.get(HTTP_METRICS)
    if metrics is not None:
        metrics.requests.labels(UNPARSED, UNPARSED, str(status)).inc()


class _Snapshot:
    """A collector over values already read from Redis (collect() cannot await)."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


async def job_metrics(redis: Redis, queue: str) -> list[Metric]:
    now_ms = time.time() * 1000
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(COUNTERS_KEY)
        pipe.hgetall(DURATION_KEY)
        pipe.hgetall(LATENCY_KEY)
        pipe.zcount(queue, "-inf", now_ms)
        pipe.zcount(queue, f"({now_ms}", "+inf")
        pipe.zcard(RUNNING_KEY)
        pipe.zcard(DEAD_INDEX_KEY)
        pipe.smembers(WORKERS_KEY)
        pipe.zrangebyscore(queue, "-inf", now_ms, start=0, num=1, withscores=True)
        drop_expired_waiting(pipe, queue)  # then count the jobs waiting for others
        pipe.zcard(waiting_key(queue))
        (
            counters,
            durations,
            latencies,
            queued,
            deferred,
            running,
            dead,
            workers,
            oldest,
            _,
            waiting,
        ) = await pipe.execute()
    schedules = await list_schedules(redis)
    # a worker's registry entry expires when it stops refreshing it: only live ones exist
    alive = await redis.exists(*[WORKER_KEY_PREFIX + as_text(w) for w in workers]) if workers else 0
    counts = _parse_counters(counters)
    metrics: list[Metric] = []
    for name, doc in JOB_COUNTERS.items():
        family = CounterMetricFamily(f"asyncjobs_jobs_{name}", doc, labels=["function"])
        for function, value in sorted(counts.get(name, {}).items()):
            family.add_metric([function], value)
        metrics.append(family)
    emails = CounterMetricFamily("asyncjobs_emails_sent", "Emails accepted by the SMTP server")
    emails.add_metric([], sum(counts.get("emails_sent", {}).values()))
    pages = CounterMetricFamily(
        "asyncjobs_pages_scraped", "Pages fetched, by HTTP status class", labels=["status_class"]
    )
    for status_class, value in sorted(counts.get("pages_scraped", {}).items()):
        pages.add_metric([status_class], value)
    refused = CounterMetricFamily(
        "asyncjobs_email_recipients_refused",
        "Recipients the SMTP server refused in messages it accepted for the others",
    )
    refused.add_metric([], sum(counts.get("recipients_refused", {}).values()))
    metrics += [emails, refused, pages]
    metrics.append(_histogram("asyncjobs_job_duration_seconds", "Job try duration", durations))
    metrics.append(_histogram(
        "asyncjobs_job_pickup_latency_seconds",
        "From when a run was due (enqueued, or a retry's or postponement's time) to its start",
        latencies,
    ))  # fmt: skip
    queued, deferred = waiting_counts(queued, deferred, running)
    depth = GaugeMetricFamily("asyncjobs_queue_depth", "Jobs waiting", labels=["state"])
    depth.add_metric([JobState.QUEUED], queued)
    depth.add_metric([JobState.DEFERRED], deferred)
    depth.add_metric([JobState.WAITING], waiting)  # for other jobs (after, then, callbacks)
    metrics.append(depth)
    # what an autoscaler (KEDA through Prometheus) reads: how long the oldest due job has waited
    age = (now_ms - oldest[0][1]) / 1000 if oldest else 0.0
    metrics.append(GaugeMetricFamily(
        "asyncjobs_queue_oldest_age_seconds", "Age of the oldest due job (0: none waits)",
        value=max(age, 0.0),
    ))  # fmt: skip
    by_state = GaugeMetricFamily("asyncjobs_schedules", "Schedules", labels=["state"])
    paused = sum(schedule.paused for schedule in schedules)
    by_state.add_metric(["active"], len(schedules) - paused)
    by_state.add_metric(["paused"], paused)
    metrics.append(by_state)
    metrics.append(GaugeMetricFamily("asyncjobs_jobs_running", "Jobs in progress", value=running))
    metrics.append(GaugeMetricFamily("asyncjobs_dead_letters", "Dead-letter entries", value=dead))
    metrics.append(GaugeMetricFamily("asyncjobs_workers_alive", "Live workers", value=alive))
    return metrics


def _parse_counters(raw: dict[Any, Any]) -> dict[str, dict[str, int]]:
    """{"completed|send_email": 3} -> {"completed": {"send_email": 3}}."""
    counts: dict[str, dict[str, int]] = {}
    for field, value in raw.items():
        metric, _, label = as_text(field).partition("|")
        counts.setdefault(metric, {})[label] = int(value)
    return counts


def _histogram(name: str, doc: str, raw: dict[Any, Any]) -> HistogramMetricFamily:
    """Rebuild cumulative buckets from the per-bucket counts the monitor stores."""
    per_function: dict[str, dict[str, float]] = {}
    for field, value in raw.items():
        function, _, part = as_text(field).rpartition("|")
        per_function.setdefault(function, {})[part] = float(value)
    family = HistogramMetricFamily(name, doc, labels=["function"])
    for function, parts in sorted(per_function.items()):
        cumulative, buckets = 0.0, []
        for bound in (*(f"{b:g}" for b in DURATION_BUCKETS), "+Inf"):
            cumulative += parts.get(bound, 0.0)
            buckets.append((bound, cumulative))
        family.add_metric([function], buckets, sum_value=parts.get("sum", 0.0))
    return family


async def metrics_endpoint(request: web.Request) -> web.Response:
    registry = CollectorRegistry()
    registry.register(request.app[HTTP_METRICS].registry)
    snapshot = await job_metrics(request.app[REDIS], request.app[SETTINGS].queue_name)
    registry.register(_Snapshot(snapshot))
    body = generate_latest(registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_metrics(app: web.Application) -> None:
    app[HTTP_METRICS] = HttpMetrics()
    # outermost: it sees the answer the client gets, after the JSON error middleware made a
    # 422 of a ValidationError and after auth and the rate limit answered 401, 403 or 429
    app.middlewares.insert(0, count_requests)
    app.router.add_get("/metrics", metrics_endpoint)
