"""The jobs list (/ui/jobs): search, filters, pages over every kept job, batches in one row, the
summary column and local times. In Chromium (as tests/dashboard/test_dashboard_browser.py drives it)
against a real worker, and over HTTP for the edge cases, with job records written as arq's
finish writes them."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.jobs import serialize_result
from arq.worker import Worker
from playwright.async_api import Page, expect
from selectolax.lexbor import LexborHTMLParser

from app.dashboard import joblist
from asyncjobs.arqcompat import result_key_prefix
from asyncjobs.keys import RECENT_KEY
from asyncjobs.settings import Settings
from jobs.engine.monitor import JobMonitor
from jobs.enqueue import enqueue_registered_many
from tests.conftest import start_worker, stop_worker
from tests.dashboard import test_dashboard as http_tests
from tests.dashboard import test_dashboard_browser as browser_tests
from tests.helpers import ApiClient, wait_for
from tests.jobwait import wait_job

# the fixtures of the dashboard's other tests: a browser page, an HTTP client with cookies
browser, page, ui = browser_tests.browser, browser_tests.page, http_tests.ui
log_in, log_in_over_http = browser_tests.log_in, http_tests.log_in

ENQUEUE_CHUNK = 250


@pytest.fixture
async def quiet_worker(settings: Settings, redis: ArqRedis) -> AsyncIterator[Worker]:
    """A real worker without cron jobs: the jobs a test enqueues are the only ones listed."""
    running, task = await start_worker(settings, cron_jobs=[])
    yield running
    await stop_worker(running, task)


def address(n: int) -> str:
    return f"customer{n:04d}@example.com"


async def send_emails(redis: ArqRedis, settings: Settings, count: int) -> list[str]:
    """`count` emails to distinct recipients, enqueued in a few pipelines; their job ids."""
    ids: list[str] = []
    for first in range(0, count, ENQUEUE_CHUNK):
        calls: list[tuple[dict[str, Any], str | None]] = [
            ({"email": {"to": address(n), "subject": f"Invoice {n}", "text": "Hi"}}, None)
            for n in range(first, min(count, first + ENQUEUE_CHUNK))
        ]
        ids += [i for i in await enqueue_registered_many(redis, settings, "send_email", calls) if i]
    assert len(ids) == count
    return ids


async def all_finished(redis: ArqRedis, count: int) -> None:
    """Until the worker's monitor has indexed `count` finished jobs (it writes once a second)."""

    async def indexed() -> bool:
        return int(await redis.zcard(RECENT_KEY)) >= count

    await wait_for(indexed, timeout=120, what=f"{count} finished jobs in the index")


def record(
    job_id: str,
    function: str,
    kwargs: dict[str, Any],
    finished_ms: int,
    *,
    success: bool = True,
    result: Any = None,
) -> bytes:
    """A job's result as arq's finish writes it (`arq:result:<id>`)."""
    data = serialize_result(
        function, (), kwargs, 1, finished_ms - 50, success,
        result if success else RuntimeError(str(result)),
        finished_ms - 20, finished_ms, f"{job_id}:{function}", "arq:queue", job_id,
    )  # fmt: skip
    assert data is not None
    return data


async def recorded(redis: ArqRedis, jobs: list[tuple[str, str, dict[str, Any], int]]) -> None:
    """Finished jobs (id, function, kwargs, finish ms) written as the worker leaves them: the
    result under arq's key, the id in the finished index."""
    async with redis.pipeline(transaction=False) as pipe:
        for job_id, function, kwargs, at in jobs:
            pipe.set(result_key_prefix + job_id, record(job_id, function, kwargs, at), ex=3600)
            pipe.zadd(RECENT_KEY, {job_id: at})
        await pipe.execute()


def email(n: int) -> dict[str, Any]:
    return {"email": {"to": address(n), "subject": f"Invoice {n}", "text": "Hi"}}


def row_ids(html: str) -> list[str]:
    """The rows' job ids, a batch's members (inside its row) left out."""
    tree = LexborHTMLParser(f"<table><tbody>{html}</tbody></table>")
    return [
        str(node.attributes["data-job-id"])
        for node in tree.css("tr[data-job-id]")
        if not any(
            a.tag == "table" and a.attributes.get("class") == "members" for a in ancestors(node)
        )
    ]


def ancestors(node: Any) -> list[Any]:
    found = []
    while (node := node.parent) is not None:
        found.append(node)
    return found


def older_link(html: str) -> str | None:
    """The "older" link, as the rows' URL."""
    found = re.search(r'<a href="([^"]+)" class="older"', html)
    if found is None:
        return None
    return found.group(1).replace("&amp;", "&").replace("/ui/jobs?", "/ui/jobs/rows?")


# -- in Chromium, with a real worker --


@pytest.mark.slow
@pytest.mark.timeout(180)  # past its own waits (120 s); the global one is 120 s
async def test_search_finds_a_job_by_a_recipients_address_among_1000(
    page: Page, redis: ArqRedis, settings: Settings, quiet_worker: Worker
) -> None:
    ids = await send_emails(redis, settings, 1000)
    await all_finished(redis, 1000)
    await log_in(page)
    await page.goto("/ui/jobs")
    await expect(page.locator("#jobs > tbody > tr[data-job-id]")).to_have_count(50)

    # the first one sent: the oldest of the 1,000, far past the first page
    await page.fill('input[name="q"]', address(0))
    await page.click(".filters button[type=submit]")
    await expect(page).to_have_url(re.compile(r"/ui/jobs\?q=customer0000%40example\.com(&|$)"))
    rows = page.locator("#jobs > tbody > tr[data-job-id]")
    await expect(rows).to_have_count(1)
    row = page.locator(f'tr[data-job-id="{ids[0]}"]')
    await expect(row.locator("td.summary")).to_contain_text(f"to {address(0)}")
    await expect(row.locator("td.summary")).to_contain_text("subject Invoice 0")
    await expect(page.locator("tr.pager")).to_contain_text("Searched 1000 jobs")
    await expect(page.locator("a.older")).to_have_count(0)  # none older than these 1,000

    # compact, local, with UTC on hover
    finished = row.locator("td.when time").last
    await expect(finished).to_have_class(re.compile(r"\blocal\b"))
    assert "UTC" not in (await finished.text_content() or "")
    assert (await finished.get_attribute("title") or "").endswith(" UTC")

    # filters combine: the same search among failed jobs finds nothing
    await page.select_option('select[name="status"]', "failed")
    await page.click(".filters button[type=submit]")
    await expect(page.locator("#jobs tr.empty")).to_have_text("No jobs match.")


@pytest.mark.slow
@pytest.mark.timeout(180)  # past its own waits (120 s); the global one is 120 s
async def test_the_next_page_shows_older_jobs(
    page: Page, redis: ArqRedis, settings: Settings, quiet_worker: Worker
) -> None:
    ids = await send_emails(redis, settings, 120)
    await all_finished(redis, 120)
    newest_first = [as_id for as_id in await redis.zrevrange(RECENT_KEY, 0, -1)]
    order = [i.decode() for i in newest_first]
    assert sorted(order) == sorted(ids)
    await log_in(page)
    await page.goto("/ui/jobs")
    rows = page.locator("#jobs > tbody > tr[data-job-id]")
    await expect(rows).to_have_count(50)
    assert await rows.evaluate_all("rows => rows.map(r => r.dataset.jobId)") == order[:50]

    await page.click("a.older")
    await expect(page).to_have_url(re.compile(r"/ui/jobs\?after="))
    await expect(rows.first).to_have_attribute("data-job-id", order[50])
    assert await rows.evaluate_all("rows => rows.map(r => r.dataset.jobId)") == order[50:100]

    await page.click("a.older")
    await expect(rows).to_have_count(20)
    assert await rows.evaluate_all("rows => rows.map(r => r.dataset.jobId)") == order[100:]
    await expect(page.locator("a.older")).to_have_count(0)
    await page.click("a.newest")
    await expect(rows.first).to_have_attribute("data-job-id", order[0])


@pytest.mark.slow
async def test_a_30_recipient_newsletter_is_one_row_that_expands(
    page: Page, api: ApiClient, quiet_worker: Worker
) -> None:
    body = {
        "subject": "Spring sale",
        "text": "Hello {{ name }}",
        "recipients": [{"email": address(n), "name": f"N{n}"} for n in range(30)],
    }
    response = await api.post("/jobs/newsletter", json=body)
    assert response.status == 202, await response.text()
    newsletter_id = (await response.json())["job_id"]
    assert (await wait_job(api, newsletter_id, timeout=60))["status"] == "complete"

    await log_in(page)
    await page.goto("/ui/jobs")
    batch = page.locator(f'#jobs > tbody > tr.batch[data-batch-id="{newsletter_id}"]')
    await expect(batch.locator("summary")).to_contain_text("30 sent, 0 failed, 0 pending")
    await expect(batch.locator("summary")).to_contain_text("Spring sale")
    await expect(page.locator("#jobs > tbody > tr")).to_have_count(2)  # the batch, the pager
    await expect(batch.locator("summary .badge.complete")).to_have_text("30 complete")
    members = batch.locator("table.members tr[data-job-id]")
    await expect(members.first).to_be_hidden()

    await batch.locator("summary").click()
    await expect(members).to_have_count(joblist.MEMBERS_SHOWN)
    await expect(members.first).to_be_visible()
    await expect(batch.locator("details")).to_have_attribute("open", "")
    # a new job changes the rows, re-fetched every second: the batch stays expanded
    other = await api.post("/jobs/email", json=email(99)["email"])
    other_id = (await other.json())["job_id"]
    await expect(page.locator(f'#jobs > tbody > tr[data-job-id="{other_id}"]')).to_be_visible()
    await expect(batch.locator("details")).to_have_attribute("open", "")

    await batch.locator("a.batch-all").click()
    await expect(page).to_have_url(re.compile(f"/ui/jobs\\?batch={newsletter_id}$"))
    rows = page.locator("#jobs > tbody > tr[data-job-id]")
    await expect(rows).to_have_count(31)  # the newsletter job and its 30 messages
    await expect(rows.nth(1)).to_have_attribute("data-job-id", f"{newsletter_id}-0")
    await expect(rows.nth(30).locator("td.summary")).to_contain_text(address(29))


# -- over HTTP, records written directly --


async def test_search_matches_id_function_status_and_arguments_not_secrets(
    ui: ApiClient,
    redis: ArqRedis,
) -> None:
    now = int(time.time() * 1000)
    http_call = {"method": "GET", "url": "https://api.example.net/orders/77",
                 "headers": {"Authorization": "Bearer abcdefghijklmnop"}}  # fmt: skip
    await recorded(
        redis,
        [
            ("job-email-1", "send_email", email(1), now - 3000),
            ("job-email-2", "send_email", email(2), now - 2000),
            ("job-http-1", "http", http_call, now - 1000),
        ],
    )
    await log_in_over_http(ui)

    async def listed(query: str) -> list[str]:
        return row_ids(await (await ui.get(f"/ui/jobs/rows?{query}")).text())

    assert await listed("") == ["job-http-1", "job-email-2", "job-email-1"]
    assert await listed("q=JOB-EMAIL-2") == ["job-email-2"]  # an id, any case
    assert await listed("q=send_em") == ["job-email-2", "job-email-1"]
    assert await listed("q=customer0001") == ["job-email-1"]
    assert await listed("q=orders/77") == ["job-http-1"]
    assert await listed("q=abcdefghijklmnop") == []  # a redacted secret is not searchable
    assert await listed("q=complete&function=http") == ["job-http-1"]
    assert await listed("q=customer&function=http") == []
    assert await listed("q=customer&status=failed") == []
    assert await listed("status=nonsense&function=send_email") == ["job-email-2", "job-email-1"]
    html = await (await ui.get("/ui/jobs/rows?q=orders")).text()
    assert "GET" in html and "https://api.example.net/orders/77" in html
    assert "abcdefghijklmnop" not in html


async def test_pages_walk_every_kept_job_even_with_equal_finish_times(
    ui: ApiClient,
    redis: ArqRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """12 jobs on 5-row pages, 7 of them finished in the same millisecond: every job once."""
    monkeypatch.setattr(joblist, "PAGE_ROWS", 5)
    now = int(time.time() * 1000)
    times = [now - 10] * 7 + [now - 20 - n for n in range(5)]
    await recorded(
        redis, [(f"job-{n:02d}", "send_email", email(n), at) for n, at in enumerate(times)]
    )
    await log_in_over_http(ui)
    seen: list[str] = []
    url: str | None = "/ui/jobs/rows"
    while url is not None:
        html = await (await ui.get(url)).text()
        ids = row_ids(html)
        assert 0 < len(ids) <= 5
        seen += ids
        url = older_link(html)
    assert seen == sorted(seen[:7], reverse=True) + [f"job-{n:02d}" for n in range(7, 12)]
    assert sorted(seen) == [f"job-{n:02d}" for n in range(12)]
    bad_cursor = await (await ui.get("/ui/jobs/rows?after=not-a-cursor")).text()
    assert row_ids(bad_cursor) == seen[:5]  # the first page


async def test_a_search_reads_a_bounded_stretch_then_links_older_ones(
    ui: ApiClient,
    redis: ArqRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(joblist, "SCAN_LIMIT", 40)
    monkeypatch.setattr(joblist, "CHUNK", 15)
    now = int(time.time() * 1000)
    await recorded(redis, [(f"job-{n:03d}", "send_email", email(n), now - n) for n in range(100)])
    await log_in_over_http(ui)
    first = await (await ui.get("/ui/jobs/rows?q=customer0090")).text()
    assert row_ids(first) == [] and "Searched 40 jobs" in first and "at most 40 a page" in first
    second_url = older_link(first)
    assert second_url is not None and "q=customer0090" in second_url
    second = await (await ui.get(second_url)).text()
    assert row_ids(second) == [] and "Searched 40 jobs" in second
    third_url = older_link(second)
    assert third_url is not None
    third = await (await ui.get(third_url)).text()
    assert row_ids(third) == ["job-090"] and older_link(third) is None


async def test_batch_members_group_and_page_by_index(
    ui: ApiClient,
    redis: ArqRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A multi-URL scrape's jobs (`<batch>-<n>`) are one row; its page lists them in order."""
    monkeypatch.setattr(joblist, "PAGE_ROWS", 4)
    batch = "0123456789abcdef0123456789abcdef"
    now = int(time.time() * 1000)
    scrapes = [
        (f"{batch}-{n}", "scrape", {"target": {"url": f"https://shop.example/p/{n}"}}, now - n)
        for n in range(6)
    ]
    await recorded(redis, [*scrapes, ("lonely", "send_email", email(1), now - 100)])
    await log_in_over_http(ui)
    rows = await (await ui.get("/ui/jobs/rows")).text()
    tree = LexborHTMLParser(f"<table><tbody>{rows}</tbody></table>")
    assert [n.attributes["data-batch-id"] for n in tree.css("tr.batch")] == [batch]
    assert row_ids(rows) == ["lonely"]
    assert "6 complete" in rows and "https://shop.example/p/5" in rows

    first = await (await ui.get(f"/ui/jobs/rows?batch={batch}")).text()
    assert row_ids(first) == [f"{batch}-{n}" for n in range(4)]
    second_url = older_link(first)
    assert second_url is not None
    assert row_ids(await (await ui.get(second_url)).text()) == [f"{batch}-4", f"{batch}-5"]


async def test_a_scrape_batchs_jobs_are_named_after_it(api: ApiClient) -> None:
    body = {"urls": ["http://127.0.0.1:9/a", "http://127.0.0.1:9/b"]}
    response = await api.post("/jobs/scrape", json=body)
    assert response.status == 202, await response.text()
    accepted = await response.json()
    batch_id = accepted["batch_id"]
    assert [job["job_id"] for job in accepted["jobs"]] == [f"{batch_id}-0", f"{batch_id}-1"]


async def test_the_finished_index_is_trimmed_by_age(redis: ArqRedis) -> None:
    """An id stays as long as arq keeps its result (keep_result), not the last N."""
    monitor = JobMonitor(redis, keep_result_s=60)
    now = time.time()
    await redis.zadd(RECENT_KEY, {"expired": (now - 61) * 1000, "kept": (now - 59) * 1000})
    for n in range(1500):  # more than the 1,000 the index used to keep
        monitor.finished(f"job-{n}", "send_email", "completed", 0.01)
    await monitor.flush()
    members = {i.decode() for i in await redis.zrange(RECENT_KEY, 0, -1)}
    assert "expired" not in members and "kept" in members and len(members) == 1501
