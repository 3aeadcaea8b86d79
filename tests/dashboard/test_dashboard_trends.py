"""Trends (/ui/trends) and the no-worker banner: the aggregation with explicit times (no test
here depends on where the clock is in its minute), the monitor's minute and hour keys in a real
Redis, a chart drawn with a real worker's numbers in Chromium, and the banner with and without a
live worker."""

from __future__ import annotations

import math
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest
from aiohttp.test_utils import TestClient, TestServer
from arq.connections import ArqRedis
from arq.worker import Worker
from playwright.async_api import Page, expect

from app.dashboard import charts
from app.dashboard.trends import SPANS, build_trends, percentile, read_trends, trend_charts
from app.web import create_app
from asyncjobs.keys import HOUR_KEY_PREFIX, MINUTE_KEY_PREFIX, RUNNING_KEY, WORKER_KEY_PREFIX
from asyncjobs.settings import Settings
from jobs.engine.monitor import JobMonitor, trend_fields
from tests.conftest import start_worker, stop_worker
from tests.dashboard.test_dashboard import log_in as log_in_http
from tests.dashboard.test_dashboard_browser import browser, log_in, page  # noqa: F401 (fixtures)
from tests.helpers import ApiClient, wait_for
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler

EMAIL = {"to": "a@example.com", "subject": "Hello", "text": "Hi"}
QUEUE = "arq:queue"


def at(text: str) -> float:
    """An explicit moment, e.g. "2024-03-01 23:59:30" (UTC), as epoch seconds."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()


# -- percentiles from histogram buckets --


def test_percentiles_are_interpolated_inside_their_bucket() -> None:
    histogram = {0.005: 50, 0.01: 30, 0.025: 20}  # 100 observations
    assert percentile(histogram, 0.5) == pytest.approx(0.005)  # the 50th: the end of bucket 1
    assert percentile(histogram, 0.95) == pytest.approx(0.01 + 0.015 * 15 / 20)
    assert percentile(histogram, 0.25) == pytest.approx(0.0025)  # from 0, inside bucket 1
    assert percentile({}, 0.5) is None
    assert percentile({0.1: 0, 1.0: 0}, 0.5) is None
    # beyond the last bound: that bound, a lower limit
    assert percentile({1.0: 1, math.inf: 9}, 0.95) == 300
    assert percentile({250.0: 0, 300.0: 1, math.inf: 1}, 0.95) == 300


def test_y_axis_ends_on_a_round_value_above_the_peak() -> None:
    assert charts.y_axis(7, whole=True) == (8, [0, 2, 4, 6, 8])
    assert charts.y_axis(0, whole=True) == (1, [0, 1])
    top, ticks = charts.y_axis(0.35, whole=False)
    assert top == pytest.approx(0.4) and len(ticks) == 5
    assert [charts.seconds_label(v) for v in (0, 0.25, 1.5, 300, 7200)] == [
        "0", "250 ms", "1.5 s", "5 min", "2 h",
    ]  # fmt: skip


# -- the monitor's minute and hour fields, across a day boundary --


def test_minutes_go_to_their_minute_and_hour_keys_across_midnight(redis: ArqRedis) -> None:
    clock = [at("2024-03-01 23:59:30")]
    monitor = JobMonitor(redis)
    monitor.clock = lambda: clock[0]
    monitor.started("a", "send_email", due_ms=(clock[0] - 0.2) * 1000)  # waited 200 ms
    monitor.finished("a", "send_email", "completed", 0.03)
    clock[0] = at("2024-03-02 00:00:10")
    monitor.started("b", "send_email", due_ms=clock[0] * 1000)
    monitor.finished("b", "send_email", "failed", 2.0)
    monitor.finished("c", "scrape", "postponed", 0.0)  # neither counted nor timed
    fields = trend_fields(monitor._pending.minutes)
    before, after = int(at("2024-03-01 23:59:00") // 60), int(at("2024-03-02 00:00:00") // 60)
    hour_before, hour_after = before // 60, after // 60
    assert hour_after == hour_before + 1
    expected = {
        (f"{MINUTE_KEY_PREFIX}{before}", "completed|send_email"): 1,
        (f"{MINUTE_KEY_PREFIX}{before}", "completed"): 1,
        (f"{MINUTE_KEY_PREFIX}{before}", "wait|send_email|0.25"): 1,
        (f"{MINUTE_KEY_PREFIX}{before}", "run|send_email|0.05"): 1,
        (f"{MINUTE_KEY_PREFIX}{after}", "failed|send_email"): 1,
        (f"{MINUTE_KEY_PREFIX}{after}", "failed"): 1,
        (f"{MINUTE_KEY_PREFIX}{after}", "wait|send_email|0.005"): 1,
        (f"{MINUTE_KEY_PREFIX}{after}", "run|send_email|2.5"): 1,
    }
    hours = {
        (key.replace(f"{MINUTE_KEY_PREFIX}{before}", f"{HOUR_KEY_PREFIX}{hour_before}")
         .replace(f"{MINUTE_KEY_PREFIX}{after}", f"{HOUR_KEY_PREFIX}{hour_after}"), name): n
        for (key, name), n in expected.items()
    }  # fmt: skip
    assert dict(fields) == expected | hours


async def test_a_day_of_hours_and_an_hour_of_minutes_read_back_with_explicit_times(
    redis: ArqRedis,
) -> None:
    """Written by a monitor whose clock says 23:58 to 00:01, read at 00:30: the day span's
    last two hours and the hour span's minutes hold them; the day's axis names the new date."""
    clock = [0.0]
    monitor = JobMonitor(redis)
    monitor.clock = lambda: clock[0]
    monitor.queue_name = QUEUE
    times = ["2024-03-01 23:58:05", "2024-03-01 23:59:59", "2024-03-02 00:00:00"]
    for i, moment in enumerate(times):
        clock[0] = at(moment)
        for n in range(i + 1):  # 1, 2, then 3 jobs
            monitor.started(f"j{i}-{n}", "send_email", due_ms=(clock[0] - 1) * 1000)
            monitor.finished(f"j{i}-{n}", "send_email", "completed", 0.2)
    monitor.finished("x", "scrape", "failed", 20.0)
    # the queue as the last flush sees it: 4 jobs due, the oldest 90 s ago; one deferred
    clock[0] = at("2024-03-02 00:01:00")
    due = {f"q{n}": (clock[0] - 90 + n) * 1000 for n in range(4)}
    await redis.zadd(QUEUE, due | {"later": (clock[0] + 3600) * 1000})
    await monitor.flush()

    now = at("2024-03-02 00:30:00")
    day = await read_trends(redis, QUEUE, SPANS["day"], "", now)
    assert len(day.periods) == 24
    assert day.periods[-1].start == datetime(2024, 3, 2, 0, tzinfo=UTC)
    assert day.periods[0].start == datetime(2024, 3, 1, 1, tzinfo=UTC)
    assert [p.tally.completed for p in day.periods[-2:]] == [3, 3]
    assert day.periods[-1].tally.failed == 1  # the scrape, at 00:01
    assert day.periods[-1].depth == 4 and day.periods[-1].oldest_s == 90
    assert day.periods[-2].depth is None  # no sample that hour
    assert day.queued_now == 4 and day.oldest_now_s == pytest.approx(29 * 60 + 90)
    rows = {row.function: row for row in day.rows}
    assert (rows["send_email"].completed, rows["send_email"].failed) == (6, 0)
    assert rows["send_email"].run_p50 == pytest.approx(0.1 + 0.15 * 3 / 6)  # all in (0.1, 0.25]
    assert rows["scrape"].failed == 1
    assert rows["scrape"].run_p95 == pytest.approx(10 + 20 * 0.95)
    day_charts = {c.id: c for c in trend_charts(day)}
    x_labels = [t.label for t in day_charts["chart-jobs"].x_ticks]
    assert "Mar 02" in x_labels and "21:00" in x_labels and x_labels[-1] == "Mar 02"
    bars = day_charts["chart-jobs"].bars
    assert [(b.series, b.value) for b in bars] == [
        ("completed", 3), ("completed", 3), ("failed", 1),
    ]  # fmt: skip

    hour = await read_trends(redis, QUEUE, SPANS["hour"], "send_email", now)
    starts = [p.start for p in hour.periods]
    assert starts[0] == datetime(2024, 3, 1, 23, 31, tzinfo=UTC) and len(starts) == 60
    by_minute = {p.start.strftime("%H:%M"): p.tally.completed for p in hour.periods}
    assert (by_minute["23:58"], by_minute["23:59"], by_minute["00:00"]) == (1, 2, 3)
    assert sum(p.tally.failed for p in hour.periods) == 0  # the scrape is filtered out
    wait = {c.id: c for c in trend_charts(hour)}["chart-wait"]
    p50 = next(line for line in wait.lines if line.series == "p50")
    assert [p.value for p in p50.points] == [pytest.approx(0.75)] * 3  # all in (0.5, 1]


def test_gaps_and_empty_spans_draw_no_data() -> None:
    numbers = [1000, 1001, 1002]
    hashes = [{"completed|f": "2", "run|f|0.1": "2"}, {}, {"completed|f": "1", "run|f|0.1": "1"}]
    trends = build_trends(SPANS["hour"], "", numbers, hashes, 0, None)
    run = {c.id: c for c in trend_charts(trends)}["chart-run"]
    assert [len(path.split()) for path in run.lines[0].paths] == [1, 1]  # broken at the gap
    empty = build_trends(SPANS["hour"], "", numbers, [{}, {}, {}], 0, None)
    assert not any(c.has_data for c in trend_charts(empty))


# -- a chart with a real worker's numbers, in Chromium --


@pytest.mark.slow
async def test_a_chart_renders_a_workers_jobs_in_chromium(
    page: Page,  # noqa: F811
    api: ApiClient,
    redis: ArqRedis,
    worker: Worker,
    smtp: tuple[RecordingSmtpHandler, int],
    settings: Settings,
) -> None:
    smtp[0].refuse_rcpt = {"gone@example.com"}
    sent, failed = 6, 2
    bodies: list[dict[str, str]] = [EMAIL] * sent + [EMAIL | {"to": "gone@example.com"}] * failed
    job_ids = [
        (await (await api.post("/jobs/email", json=body)).json())["job_id"] for body in bodies
    ]
    statuses = [(await wait_job(api, job_id))["status"] for job_id in job_ids]
    assert statuses == ["complete"] * sent + ["failed"] * failed

    async def flushed() -> bool:  # the monitor writes once a second
        trends = await read_trends(redis, settings.queue_name, SPANS["hour"], "send_email",
                                   time.time())  # fmt: skip
        row = next((r for r in trends.rows if r.function == "send_email"), None)
        return row is not None and (row.completed, row.failed) == (sent, failed)

    await wait_for(flushed, what="the worker's per-minute counts")

    await log_in(page)
    await page.click("#trends-link")
    await expect(page).to_have_url(re.compile(r"/ui/trends$"))
    await expect(page.locator("h1")).to_have_text("Trends")
    await page.select_option("#function", "send_email")
    await page.click("form.trend-filters button")
    await expect(page).to_have_url(re.compile(r"/ui/trends\?span=hour&function=send_email$"))

    jobs = page.locator("#chart-jobs")
    await expect(jobs.locator("figcaption")).to_contain_text("Jobs completed and failed per minute")

    async def total(series: str) -> float:
        values = await jobs.locator(f"rect.bar.{series}").evaluate_all(
            "bars => bars.map(bar => Number(bar.dataset.value))"
        )
        assert all(v > 0 for v in values)
        return float(sum(values))

    assert (await total("completed"), await total("failed")) == (sent, failed)
    heights = await jobs.locator("rect.bar").evaluate_all(
        "bars => bars.map(bar => bar.getBBox().height)"
    )
    assert heights and all(h > 0 for h in heights)  # drawn, not only present
    y_labels = await jobs.locator(".y-axis .tick-label").all_text_contents()
    assert y_labels[0] == "0" and len(y_labels) >= 2  # the top: a round value >= the peak
    assert float(y_labels[-1].replace(",", "")) >= max(sent, failed)
    assert len(await jobs.locator(".x-axis .tick-label").all_text_contents()) >= 5
    await expect(jobs.locator(".axis-title")).to_have_text(["jobs per minute", "time (UTC)"])

    run = page.locator("#chart-run")
    run_points = await run.locator(".series.p95 circle").evaluate_all(
        "points => points.map(p => Number(p.dataset.value))"
    )
    assert run_points and all(0 < v <= 300 for v in run_points)
    await expect(run.locator("figcaption")).to_have_text("Run time (send_email)")
    await expect(run.locator(".axis-title").first).to_have_text("seconds")
    row = page.locator('#trend-table tr[data-function="send_email"] td')
    await expect(row.nth(1)).to_have_text(str(sent))
    await expect(row.nth(2)).to_have_text(str(failed))
    await expect(page.locator("#no-worker-banner")).to_have_count(0)

    await page.select_option("#span", "day")
    await page.click("form.trend-filters button")
    await expect(page.locator("#chart-jobs figcaption")).to_contain_text("per hour")
    assert (await total("completed"), await total("failed")) == (sent, failed)


# -- the banner --


@pytest.fixture
async def ui(settings: Settings, redis: ArqRedis) -> AsyncIterator[ApiClient]:
    async with TestClient(TestServer(create_app(settings), host="127.0.0.1")) as client:
        yield client


async def test_banner_when_jobs_wait_and_no_worker_consumes(
    ui: ApiClient,
    api: ApiClient,
    redis: ArqRedis,
    make_settings: Callable[..., Settings],
    smtp: tuple[RecordingSmtpHandler, int],
) -> None:
    await log_in_http(ui)
    banner = 'id="no-worker-banner"'
    assert banner not in await (await ui.get("/ui")).text()  # nothing queued: no banner

    smtp[0].gate.clear()  # the worker's one slot stays busy with the first message
    for n in range(3):
        response = await api.post("/jobs/email", json=EMAIL | {"to": f"r{n}@example.com"})
        assert response.status == 202
    for path in ("/ui", "/ui/trends", "/ui/dead-letter"):
        html = await (await ui.get(path)).text()
        assert banner in html, path
        assert re.search(r"3 jobs waiting", html), path

    worker, task = await start_worker(make_settings(worker_max_jobs=1), cron_jobs=[])
    try:

        async def alive_with_jobs_waiting() -> bool:
            workers = await redis.keys(f"{WORKER_KEY_PREFIX}*")
            due = await redis.zcount(QUEUE, "-inf", "+inf") - 1  # one is in progress
            return bool(workers) and due >= 2 and await redis.zcard(RUNNING_KEY) == 1

        await wait_for(alive_with_jobs_waiting, what="a live worker busy, two jobs due")
        assert banner not in await (await ui.get("/ui")).text()
    finally:
        await stop_worker(worker, task)
        smtp[0].gate.set()
    # the worker said goodbye (its heartbeat deleted): jobs still wait, the banner is back
    assert banner in await (await ui.get("/ui/jobs")).text()
