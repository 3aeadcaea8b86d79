"""The dashboard in a real browser: Debian's headless Chromium, driven by Playwright, against the
real app, a real worker and the recording SMTP sink. Nothing here reloads a page to see a change.

Chromium comes from apt (`apt-get install chromium`; .ci/run does it), never `playwright install`.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from arq.worker import Worker
from PIL import Image
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect

from tests.conftest import API_KEY
from tests.helpers import ApiClient, wait_for
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # tests run as root in CI
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
TIMEOUT_MS = 15_000
EMAIL = {"to": "a@example.com", "subject": "Hello", "text": "Hi"}

expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (see .ci/run)")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        await browser.close()


@pytest.fixture
async def page(browser: Browser, api: ApiClient) -> AsyncIterator[Page]:
    """A fresh browser profile on the app that `api` talks to; fails the test on script errors
    (a Content-Security-Policy violation among them)."""
    context = await browser.new_context(base_url=str(api.make_url("")))
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    def on_console(message: ConsoleMessage) -> None:
        # a 4xx page we asked for is logged as a failed load; that is not a script error
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            errors.append(message.text)

    page.on("console", on_console)
    yield page
    await context.close()
    assert errors == [], f"errors in the browser console: {errors}"


async def log_in(page: Page) -> None:
    await page.goto("/ui")
    await expect(page).to_have_url(re.compile(r"/ui/login$"))
    await page.fill("#key", API_KEY)
    await page.click("form.login button")
    await expect(page).to_have_url(re.compile(r"/ui$"))


async def enqueue_email(api: ApiClient, **changes: str) -> tuple[str, str]:
    response = await api.post("/jobs/email", json=EMAIL | changes)
    assert response.status == 202
    body = await response.json()
    return body["job_id"], body["message_id"]


@pytest.mark.slow
async def test_log_in_and_out_through_the_form(page: Page) -> None:
    await page.goto("/ui/jobs")
    await expect(page).to_have_url(re.compile(r"/ui/login$"))
    await page.fill("#key", "not-the-key")
    await page.click("form.login button")
    await expect(page.locator(".alert")).to_have_text("That key is not valid.")

    await page.fill("#key", API_KEY)
    await page.click("form.login button")
    await expect(page).to_have_url(re.compile(r"/ui$"))
    await expect(page.locator("h1")).to_have_text("Overview")
    cookies = await page.context.cookies()
    session = next(c for c in cookies if c["name"] == "asyncjobs_session")
    assert session["httpOnly"] and session["sameSite"] == "Strict" and session["path"] == "/ui"
    assert await page.evaluate("document.cookie") == ""  # out of reach of scripts

    await page.click("form.logout button")
    await expect(page).to_have_url(re.compile(r"/ui/login$"))
    await page.goto("/ui")
    await expect(page).to_have_url(re.compile(r"/ui/login$"))


@pytest.mark.slow
async def test_new_job_shows_up_and_completes_without_a_reload(
    page: Page, api: ApiClient, worker: Worker, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    handler, _ = smtp
    handler.gate.clear()  # the sink holds every message until the test lets it through
    await log_in(page)
    await page.goto("/ui/jobs")
    await page.evaluate("window.__marker = 1")

    job_id, message_id = await enqueue_email(api)
    row = page.locator(f'tr[data-job-id="{job_id}"]')
    await expect(row).to_be_visible()
    await expect(row.locator(".badge")).to_have_text("in_progress")
    assert await page.evaluate("window.__marker") == 1, "the jobs page reloaded"

    await row.locator("a").click()
    await expect(page).to_have_url(re.compile(f"/ui/jobs/{job_id}$"))
    await page.evaluate("window.__marker = 2")
    await expect(page.locator("#status")).to_have_text("in_progress")
    await expect(page.locator("#abort-form")).to_be_visible()

    handler.gate.set()
    await expect(page.locator("#status")).to_have_text("complete")
    await expect(page.locator("#result")).to_contain_text(message_id)
    await expect(page.locator("#finish_time")).to_contain_text("UTC")
    await expect(page.locator("#abort-form")).to_be_hidden()
    assert await page.evaluate("window.__marker") == 2, "the job page reloaded"
    assert handler.message_ids() == [message_id]


@pytest.mark.slow
async def test_abort_a_running_job_from_its_page(
    page: Page, api: ApiClient, worker: Worker, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    handler, _ = smtp
    handler.data_delay = 30  # the job stays in progress, inside SMTP DATA
    job_id, message_id = await enqueue_email(api)
    await log_in(page)
    await page.goto(f"/ui/jobs/{job_id}")
    await expect(page.locator("#status")).to_have_text("in_progress")

    await page.click("#abort-form button")
    await expect(page).to_have_url(re.compile(f"/ui/jobs/{job_id}$"))
    await expect(page.locator("#status")).to_have_text("aborted")
    await expect(page.locator("#error")).to_have_text("aborted")
    await expect(page.locator("#abort-form")).to_be_hidden()
    assert (await wait_job(api, job_id))["status"] == "aborted"

    # The server had the whole message when the abort cut the reply short: as a real MTA does,
    # it delivers it (docs/api.md, DELETE /jobs/{id}); the job is not tried again.
    async def delivered_once() -> bool:
        return handler.message_ids() == [message_id]

    await wait_for(delivered_once, what="the cut message kept by the server, once")


@pytest.mark.slow
async def test_retry_a_dead_letter_from_the_list(
    page: Page, api: ApiClient, worker: Worker, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    handler, _ = smtp
    handler.refuse_rcpt = {"gone@example.com"}
    dead_id, message_id = await enqueue_email(api, to="gone@example.com", subject="Came back")
    assert (await wait_job(api, dead_id))["status"] == "failed"
    handler.refuse_rcpt = set()  # the mailbox exists again

    await log_in(page)
    await page.goto("/ui/dead-letter")
    entry = page.locator(f'tr[data-entry-id="{dead_id}"]')
    await expect(entry).to_contain_text("550")
    await entry.locator("button", has_text="Retry").click()

    await expect(page).to_have_url(re.compile(r"/ui/jobs/[0-9a-f]{32}$"))
    assert not page.url.endswith(dead_id)
    await expect(page.locator("#status")).to_have_text("complete")
    await expect(page.locator("#tries")).to_have_text("1")

    async def delivered() -> bool:
        return [m.rcpt_tos for m in handler.messages] == [["gone@example.com"]]

    await wait_for(delivered, what="the retried message in the sink")
    assert handler.message_ids() == [message_id]
    await page.goto("/ui/dead-letter")
    await expect(page.locator(f'tr[data-entry-id="{dead_id}"]')).to_have_count(0)


@pytest.mark.slow
async def test_overview_screenshot_is_not_blank(
    page: Page,
    api: ApiClient,
    worker: Worker,
    smtp: tuple[RecordingSmtpHandler, int],
    tmp_path: Path,
) -> None:
    smtp[0].refuse_rcpt = {"gone@example.com"}
    for changes in ({}, {"to": "gone@example.com"}):
        job_id, _ = await enqueue_email(api, **changes)
        await wait_job(api, job_id)
    await log_in(page)

    async def counted() -> bool:  # the worker writes its per-minute figures once a second
        await page.goto("/ui")
        return await page.locator("#completed").text_content() != "0"

    await wait_for(counted, what="the completed job on the overview")
    await expect(page.locator("#workers")).to_have_text("1")
    # Some minute's bar has a height: which one depends on the side of a minute boundary the
    # jobs ran (the last bar is the current minute, empty if they ended in the one before).
    await expect(page.locator('svg.chart rect.ok:not([height="0.0"])')).not_to_have_count(0)

    shot = tmp_path / "overview.png"
    await page.screenshot(path=shot, full_page=True)
    with Image.open(shot) as image:
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=rgb.width * rgb.height) or []
    assert len(colours) > 20, f"only {len(colours)} colours: a blank page?"
    most_common = max(count for count, _ in colours)
    assert most_common < rgb.width * rgb.height * 0.95, "one colour covers nearly all of it"
    present = {colour for _, colour in colours}
    assert (0x1F, 0x9D, 0x55) in present, "no completed bar in the chart"
    assert (0xD6, 0x45, 0x45) in present, "no failed bar (or card) on the page"
