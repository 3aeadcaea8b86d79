"""Trends at /ui/trends: completed and failed jobs, wait and run time percentiles, queue depth
and the oldest job's age, per minute over the last hour or per hour over the last day, for all
job types or one.

Read from the minute and hour hashes the worker's monitor writes (jobs/engine/monitor.py):
counts "<outcome>|<function>", histograms "wait|<function>|<bucket>" (due to start) and
"run|<function>|<bucket>" (a try's run time), and the queue as sampled at each flush
("depth_max", "age_max_ms": the largest sample in the bucket). One pipelined round trip reads a
span: 60 minute keys or 24 hour keys, and the queue now.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from arq.connections import ArqRedis
from redis.asyncio import Redis

from app.dashboard import charts
from app.dashboard.views import render
from app.state import REDIS, SETTINGS
from asyncjobs.keys import HOUR_KEY_PREFIX, MINUTE_KEY_PREFIX
from asyncjobs.registry import job_types
from jobs.engine.monitor import DURATION_BUCKETS
from jobs.values import as_text

BOUNDS = {float(b) for b in DURATION_BUCKETS} | {math.inf}
LAST_BOUND = float(DURATION_BUCKETS[-1])
Histogram = dict[float, int]  # a bucket's upper bound (math.inf for "+Inf") -> observations


@dataclass(frozen=True)
class Span:
    name: str
    label: str
    step_s: int  # one bucket's length
    count: int  # buckets shown, the current one last
    prefix: str  # the Redis keys of its buckets: prefix + epoch bucket number


SPANS = {
    "hour": Span("hour", "Last hour, per minute", 60, 60, MINUTE_KEY_PREFIX),
    "day": Span("day", "Last day, per hour", 3600, 24, HOUR_KEY_PREFIX),
}


def bucket_numbers(span: Span, now: float) -> list[int]:
    """Epoch minutes (or hours) of the span, oldest first, the one holding `now` last."""
    current = int(now // span.step_s)
    return list(range(current - span.count + 1, current + 1))


# -- percentiles from histogram buckets --


def percentile(histogram: Histogram, q: float) -> float | None:
    """The q-quantile (0 < q <= 1) of a histogram's observations, interpolated linearly inside
    its bucket (as Prometheus' histogram_quantile); None without observations. An observation
    past the last finite bound (300 s) counts as that bound: the answer is then a lower limit."""
    total = sum(histogram.values())
    if total <= 0:
        return None
    rank = q * total
    seen, lower = 0, 0.0
    for bound in sorted(set(histogram) | BOUNDS):  # a bucket's lower bound: the previous one
        count = histogram.get(bound, 0)
        if count and seen + count >= rank:
            if math.isinf(bound):
                return max(lower, LAST_BOUND)
            return lower + (bound - lower) * (rank - seen) / count
        seen += count
        if not math.isinf(bound):
            lower = bound
    return lower


def _bound(text: str) -> float | None:
    if text == "+Inf":
        return math.inf
    try:
        return float(text)
    except ValueError:
        return None


# -- one bucket's fields --


@dataclass
class Tally:
    """What one bucket (or a whole span) holds for one function, or for all."""

    completed: int = 0
    failed: int = 0
    wait: Counter[float] = field(default_factory=Counter)
    run: Counter[float] = field(default_factory=Counter)

    def add(self, other: Tally) -> None:
        self.completed += other.completed
        self.failed += other.failed
        self.wait.update(other.wait)
        self.run.update(other.run)

    def p(self, kind: str, q: float) -> float | None:
        return percentile(dict(self.wait if kind == "wait" else self.run), q)


def parse_bucket(fields: Mapping[str, str]) -> dict[str, Tally]:
    """A minute or hour hash -> a Tally per function (the overview's totals are not read)."""
    tallies: dict[str, Tally] = defaultdict(Tally)
    for name, raw in fields.items():
        parts = name.split("|")
        try:
            n = int(raw)
        except ValueError:
            continue
        if len(parts) == 2 and parts[0] in ("completed", "failed"):
            tally = tallies[parts[1]]
            if parts[0] == "completed":
                tally.completed += n
            else:
                tally.failed += n
        elif len(parts) == 3 and parts[0] in ("wait", "run"):
            bound = _bound(parts[2])
            if bound is None:
                continue
            tally = tallies[parts[1]]
            (tally.wait if parts[0] == "wait" else tally.run)[bound] += n
    return dict(tallies)


def merged(tallies: Mapping[str, Tally], function: str = "") -> Tally:
    """One function's tally, or ("") all functions' together."""
    total = Tally()
    for name, tally in tallies.items():
        if not function or name == function:
            total.add(tally)
    return total


def _int_or_none(fields: Mapping[str, str], name: str) -> int | None:
    value = fields.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


# -- a span --


@dataclass(frozen=True)
class Period:
    start: datetime
    tally: Tally  # of the chosen function, or of all
    depth: int | None  # the largest queue depth sampled, None when no worker sampled it
    oldest_s: float | None  # the largest age of the oldest due job sampled


@dataclass(frozen=True)
class FunctionRow:
    function: str
    completed: int
    failed: int
    wait_p50: float | None
    wait_p95: float | None
    run_p50: float | None
    run_p95: float | None


@dataclass(frozen=True)
class Trends:
    span: Span
    function: str  # "" for all
    periods: list[Period]
    rows: list[FunctionRow]  # every function seen in the span
    queued_now: int
    oldest_now_s: float | None


def build_trends(
    span: Span,
    function: str,
    numbers: Sequence[int],
    hashes: Sequence[Mapping[str, str]],
    queued_now: int,
    oldest_now_s: float | None,
) -> Trends:
    """From the span's hashes (one per bucket number, oldest first): pure, for tests."""
    periods = []
    per_function: dict[str, Tally] = defaultdict(Tally)
    for number, fields in zip(numbers, hashes, strict=True):
        tallies = parse_bucket(fields)
        for name, tally in tallies.items():
            per_function[name].add(tally)
        age_ms = _int_or_none(fields, "age_max_ms")
        periods.append(
            Period(
                start=datetime.fromtimestamp(number * span.step_s, UTC),
                tally=merged(tallies, function),
                depth=_int_or_none(fields, "depth_max"),
                oldest_s=None if age_ms is None else age_ms / 1000,
            )
        )
    rows = [
        FunctionRow(
            function=name,
            completed=tally.completed,
            failed=tally.failed,
            wait_p50=tally.p("wait", 0.5),
            wait_p95=tally.p("wait", 0.95),
            run_p50=tally.p("run", 0.5),
            run_p95=tally.p("run", 0.95),
        )
        for name, tally in sorted(per_function.items())
    ]
    return Trends(span, function, periods, rows, queued_now, oldest_now_s)


async def read_trends(
    redis: Redis, queue_name: str, span: Span, function: str, now: float
) -> Trends:
    numbers = bucket_numbers(span, now)
    now_ms = int(now * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        for number in numbers:
            pipe.hgetall(f"{span.prefix}{number}")
        pipe.zcount(queue_name, "-inf", now_ms)
        pipe.zrangebyscore(queue_name, "-inf", now_ms, start=0, num=1, withscores=True)
        *raw, queued, oldest = await pipe.execute()
    hashes = [{as_text(k): as_text(v) for k, v in fields.items()} for fields in raw]
    oldest_s = max(0.0, (now_ms - oldest[0][1]) / 1000) if oldest else None
    return build_trends(span, function, numbers, hashes, int(queued), oldest_s)


# -- charts --


def trend_charts(trends: Trends) -> list[charts.Chart]:
    span, periods = trends.span, trends.periods
    starts = [p.start for p in periods]
    per = "minute" if span.step_s == 60 else "hour"
    who = f" ({trends.function})" if trends.function else ""
    step = span.step_s

    def series(kind: str) -> list[tuple[str, str, list[float | None]]]:
        return [
            ("p50", "p50", [p.tally.p(kind, 0.5) for p in periods]),
            ("p95", "p95", [p.tally.p(kind, 0.95) for p in periods]),
        ]

    completed: list[float | None] = [p.tally.completed for p in periods]
    failed: list[float | None] = [p.tally.failed for p in periods]
    depth: list[float | None] = [p.depth for p in periods]
    oldest: list[float | None] = [p.oldest_s for p in periods]
    return [
        charts.stacked_bars(
            "chart-jobs", f"Jobs completed and failed per {per}{who}", starts, step,
            [("completed", "completed", completed), ("failed", "failed", failed)],
            y_label=f"jobs per {per}",
        ),
        charts.line_chart(
            "chart-wait", f"Wait time, enqueue (or due) to start{who}", starts, step,
            series("wait"), y_label="seconds",
        ),
        charts.line_chart(
            "chart-run", f"Run time{who}", starts, step, series("run"), y_label="seconds"
        ),
        charts.line_chart(
            "chart-depth", f"Queue depth (jobs due, largest sample per {per}; all types)",
            starts, step, [("depth", "queued", depth)], y_label="jobs",
            label=charts.count_label, whole=True,
        ),
        charts.line_chart(
            "chart-oldest", f"Oldest queued job's age (largest sample per {per}; all types)",
            starts, step, [("oldest", "oldest job's age", oldest)], y_label="seconds",
        ),
    ]  # fmt: skip


# -- the page --


def function_choices(trends: Trends) -> list[str]:
    return sorted({t.name for t in job_types()} | {row.function for row in trends.rows})


async def trends_page(request: web.Request) -> web.Response:
    span = SPANS.get(request.query.get("span", ""), SPANS["hour"])
    function = request.query.get("function", "")[:100]
    redis: ArqRedis = request.config_dict[REDIS]
    queue_name = request.config_dict[SETTINGS].queue_name
    trends = await read_trends(redis, queue_name, span, function, time.time())
    context: dict[str, Any] = {
        "trends": trends,
        "charts": trend_charts(trends),
        "spans": list(SPANS.values()),
        "functions": function_choices(trends),
        "seconds": charts.seconds_label,
    }
    return render(request, "trends.html", context)


def add_trends_routes(app: web.Application) -> None:
    app.router.add_get("/trends", trends_page, name="trends")
