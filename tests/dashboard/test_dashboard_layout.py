"""The dashboard's layout in Chromium (as tests/dashboard/test_dashboard_browser.py drives it):
a phone's header, no console errors on any page, dark mode, the job page's tries and long lists,
and a message of the dev mail sink opened. Every wait is on a condition, with a deadline."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from arq.worker import Worker
from playwright.async_api import Browser, ConsoleMessage, Page, Request, Response, expect

from asyncjobs.settings import Settings
from tests.dashboard.test_dashboard_browser import TIMEOUT_MS, browser, log_in  # noqa: F401
from tests.helpers import ApiClient
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler

PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1440, "height": 900}
EMAIL = {"to": "a@example.com", "subject": "Hello", "text": "Hi"}
FLAKY = "flaky@example.com"


@pytest.fixture
def settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Settings:
    return make_settings(mail_sink_dir=tmp_path / "mail")


@dataclass
class Problems:
    """What a page should never show: script errors, console errors, failed requests."""

    console: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))
        page.on("console", self._on_console)
        page.on("requestfailed", self._on_failed)
        page.on("response", self._on_response)

    def _on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.console.append(f"{message.text} ({message.location.get('url')})")

    def _on_failed(self, request: Request) -> None:
        # leaving a page cancels its live requests (the rows' fetch, the job's event stream)
        if request.failure != "net::ERR_ABORTED":
            self.requests.append(f"{request.method} {request.url}: {request.failure}")

    def _on_response(self, response: Response) -> None:
        if response.status >= 400:
            self.requests.append(f"{response.request.method} {response.url}: {response.status}")


@contextlib.asynccontextmanager
async def signed_in(
    browser: Browser,  # noqa: F811
    api: ApiClient,
    **options: Any,
) -> AsyncIterator[tuple[Page, Problems]]:
    context = await browser.new_context(base_url=str(api.make_url("")), **options)
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    problems = Problems()
    problems.watch(page)
    try:
        await log_in(page)
        yield page, problems
    finally:
        await context.close()


async def enqueue(api: ApiClient, path: str, body: dict[str, Any]) -> str:
    response = await api.post(path, json=body)
    assert response.status == 202, await response.text()
    job_id: str = (await response.json())["job_id"]
    return job_id


def write_message(folder: Path, script: str = "") -> str:
    """A message with text, HTML (with `script` in it) and an attachment."""
    message = EmailMessage()
    message["From"] = "Ada <ada@example.com>"
    message["To"] = "bob@example.com"
    message["Subject"] = "Your invoice"
    message.set_content("Plain text body")
    message.add_alternative(
        f"<html><body><h1 id='inner'>HTML body</h1>{script}</body></html>",
        subtype="html",
    )
    message.add_attachment(b"%PDF-1.4 fake", maintype="application", subtype="pdf",
                           filename="invoice.pdf")  # fmt: skip
    envelope = b"X-Sink-Mail-From: ada@example.com\r\nX-Sink-Rcpt-To: bob@example.com\r\n"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{1_700_000_000_000_000_000:019d}-0123abcd.eml"
    (folder / name).write_bytes(envelope + message.as_bytes())
    return name


async def sample_data(api: ApiClient, settings: Settings, smtp: RecordingSmtpHandler) -> list[str]:
    """One job of each outcome, a dead letter, a source, a schedule and a message in the sink;
    the detail pages to visit besides the header's."""
    done = await enqueue(api, "/jobs/email", EMAIL)
    smtp.refuse_rcpt = {"gone@example.com"}
    dead = await enqueue(api, "/jobs/email", EMAIL | {"to": "gone@example.com"})
    for job_id in (done, dead):
        await wait_job(api, job_id)
    source = await api.post("/sources", json={"url": "http://127.0.0.1:9/", "schedule": "daily"})
    assert source.status == 201
    schedule = {"cron": "0 9 * * 1", "job": {"type": "email", "body": EMAIL}}
    assert (await api.post("/schedules", json=schedule)).status == 201
    assert settings.mail_sink_dir is not None
    name = write_message(settings.mail_sink_dir)
    source_id = (await source.json())["id"]
    return [f"/ui/jobs/{done}", f"/ui/jobs/{dead}", f"/ui/sources/{source_id}", f"/ui/mail/{name}"]


async def every_page(page: Page, details: list[str]) -> list[str]:
    await page.goto("/ui")
    links = await page.locator("header nav a").evaluate_all("links => links.map(a => a.href)")
    return list(dict.fromkeys([*map(str, links), *details]))


async def overflow(page: Page) -> list[str]:
    """Header controls outside the viewport, and the page's width past it."""
    found: list[str] = await page.evaluate(
        """() => {
        const width = document.documentElement.clientWidth;
        const out = [];
        for (const el of document.querySelectorAll("header a, header button")) {
            const box = el.getBoundingClientRect();
            if (box.left < 0 || box.right > width || box.width === 0) out.push(el.textContent);
        }
        if (document.documentElement.scrollWidth > width)
            out.push(`page ${document.documentElement.scrollWidth} px wide`);
        return out;
    }"""
    )
    return found


@pytest.mark.slow
async def test_phone_header_fits_and_pages_scroll_only_inside_tables(
    browser: Browser,  # noqa: F811
    api: ApiClient,
    worker: Worker,
    settings: Settings,
    smtp: tuple[RecordingSmtpHandler, int],
) -> None:
    details = await sample_data(api, settings, smtp[0])
    async with signed_in(browser, api, viewport=PHONE) as (page, problems):
        pages = await every_page(page, details)
        assert len(pages) >= 9, pages
        for url in pages:
            await page.goto(url)
            await expect(page.locator("header button", has_text="Log out")).to_be_in_viewport()
            assert await overflow(page) == [], url
        assert problems.console == [], problems.console


@pytest.mark.slow
async def test_no_console_errors_or_failed_requests_on_any_page(
    browser: Browser,  # noqa: F811
    api: ApiClient,
    worker: Worker,
    settings: Settings,
    smtp: tuple[RecordingSmtpHandler, int],
) -> None:
    details = await sample_data(api, settings, smtp[0])
    async with signed_in(browser, api, viewport=DESKTOP) as (page, problems):
        for url in await every_page(page, details):
            await page.goto(url)
            await page.wait_for_load_state("load")
            icon = page.locator("link[rel=icon]")
            await expect(icon).to_have_attribute("href", "/ui/static/favicon.svg")
        favicon = await page.context.request.get("/favicon.ico")  # follows the redirect
        assert favicon.status == 200 and favicon.headers["content-type"] == "image/svg+xml"
        assert problems.console == [], problems.console
        assert problems.requests == [], problems.requests
    anonymous = await browser.new_context(base_url=str(api.make_url("")))
    try:
        moved = await anonymous.request.get("/favicon.ico", max_redirects=0)
        assert moved.status == 301 and moved.headers["location"] == "/ui/static/favicon.svg"
        assert (await anonymous.request.get("/ui/static/favicon.svg")).status == 200
    finally:
        await anonymous.close()


@pytest.mark.slow
async def test_dark_mode_follows_the_system(
    browser: Browser,  # noqa: F811
    api: ApiClient,
) -> None:
    script = "getComputedStyle(document.documentElement).backgroundColor"
    for scheme, dark in (("dark", True), ("light", False)):
        async with signed_in(browser, api, color_scheme=scheme) as (page, problems):
            await page.goto("/ui/jobs")
            red, green, blue = map(int, re.findall(r"\d+", await page.evaluate(script))[:3])
            luminance = (0.2126 * red + 0.7152 * green + 0.0722 * blue) / 255
            assert (luminance < 0.2) is dark, (scheme, red, green, blue)
            assert problems.console == []


@pytest.mark.slow
async def test_the_overview_refreshes_itself(
    browser: Browser,  # noqa: F811
    api: ApiClient,
) -> None:
    """The overview showed its numbers as of its load: now it fetches itself and swaps them."""
    async with signed_in(browser, api) as (page, problems):
        await page.goto("/ui")
        await expect(page.locator("#queued")).to_have_text("0")
        for n in range(3):  # no worker: they stay queued
            await enqueue(
                api, "/jobs/email", {"to": f"r{n}@example.com", "subject": "s", "text": "t"}
            )
        await expect(page.locator("#queued")).to_have_text("3")  # waits, with a deadline
        assert problems.console == []


@pytest.mark.slow
async def test_job_page_shows_every_try_with_its_error(
    browser: Browser,  # noqa: F811
    api: ApiClient,
    worker: Worker,
    smtp: tuple[RecordingSmtpHandler, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler, _ = smtp
    accept = handler.handle_RCPT

    async def busy_twice(*args: Any) -> str:  # 451 twice for FLAKY, then accepted
        address = args[3]
        if address == FLAKY and handler.rcpt_attempts[address] < 2:
            handler.rcpt_attempts[address] += 1
            return "451 4.3.0 Mailbox busy, try again later"
        return await accept(*args)

    monkeypatch.setattr(handler, "handle_RCPT", busy_twice)
    job_id = await enqueue(api, "/jobs/email", EMAIL | {"to": FLAKY})
    async with signed_in(browser, api) as (page, problems):
        await page.goto(f"/ui/jobs/{job_id}")
        await expect(page.locator("#status")).to_have_text("complete")
        rows = page.locator("#tries-list tbody tr")
        await expect(rows).to_have_count(3)  # the page follows the job: no reload
        for number, outcome in ((1, "retrying"), (2, "retrying"), (3, "complete")):
            row = rows.nth(number - 1)
            await expect(row.locator("td").first).to_have_text(str(number))
            await expect(row.locator(".badge")).to_have_text(outcome)
            await expect(row.locator("td").nth(4)).not_to_be_empty()  # the worker
        await expect(rows.nth(0).locator("td.error")).to_contain_text("451")
        await expect(rows.nth(1).locator("td.error")).to_contain_text("451")
        await expect(rows.nth(2).locator("td.error")).to_be_empty()
        await page.reload()  # and the same from the server's first render
        await expect(page.locator("#tries-list tbody tr")).to_have_count(3)
        assert problems.console == []


@pytest.mark.slow
async def test_a_thousand_recipient_newsletter_page_is_paged(
    browser: Browser,  # noqa: F811
    api: ApiClient,
) -> None:
    recipients = [
        {"email": f"reader{i}@example.com", "name": f"Reader {i}", "vars": {"token": f"s{i}"}}
        for i in range(1000)
    ]
    body = {"recipients": recipients, "subject": "News", "text": "Hello {{ name }}"}
    job_id = await enqueue(api, "/jobs/newsletter", body)
    height = "document.documentElement.scrollHeight"
    async with signed_in(browser, api, viewport=DESKTOP) as (page, problems):
        await page.goto(f"/ui/jobs/{job_id}")
        assert await page.evaluate(height) < 5000
        recipients_list = page.locator("#f-arguments\\.newsletter\\.recipients")
        await recipients_list.locator("> summary").click()
        await expect(recipients_list.locator(".pager").first).to_contain_text("1-25 of 1,000")
        await expect(recipients_list.locator("> ul > li")).to_have_count(25)
        assert await page.evaluate(height) < 5000
        await recipients_list.locator("a[rel=next]").first.click()
        await expect(page).to_have_url(re.compile(r"page\.arguments\.newsletter\.recipients=2"))
        opened = page.locator("#f-arguments\\.newsletter\\.recipients")
        await expect(opened.locator(".pager").first).to_contain_text("26-50 of 1,000")
        await opened.locator("> ul > li").first.locator("> details > summary").click()
        await expect(opened).to_contain_text("reader25@example.com")
        await expect(opened).not_to_contain_text("s25")  # vars.token: a secret's name
        assert await page.evaluate(height) < 5000
        assert problems.console == []


@pytest.mark.slow
async def test_mail_sink_opens_a_message_with_sandboxed_html_and_attachments(
    browser: Browser,  # noqa: F811
    api: ApiClient,
    settings: Settings,
) -> None:
    assert settings.mail_sink_dir is not None
    name = write_message(settings.mail_sink_dir, "<script>parent.document.title = 'pwned'</script>")
    async with signed_in(browser, api) as (page, problems):
        await page.goto("/ui/mail")
        await page.click("text=Your invoice")
        await expect(page).to_have_url(re.compile(f"/ui/mail/{name}$"))
        frame = page.locator("iframe#mail-html")
        assert await frame.get_attribute("sandbox") == ""  # sandboxed, allow-scripts not given
        inner = page.frame_locator("iframe#mail-html")
        await expect(inner.locator("#inner")).to_have_text("HTML body")
        assert await page.title() != "pwned"  # its script did not run
        await expect(page.locator("#mail-text")).to_contain_text("Plain text body")
        await expect(page.locator("#headers")).to_contain_text("Ada <ada@example.com>")
        link = page.locator("#attachments a", has_text="invoice.pdf")
        # below the fold: scrolled to first (a click that scrolls as it clicks was lost, 1 in 1)
        await link.scroll_into_view_if_needed()
        async with page.expect_download() as download_info:
            await link.click()
        download = await download_info.value
        assert download.suggested_filename == "invoice.pdf"
        assert Path(await download.path()).read_bytes() == b"%PDF-1.4 fake"
        html = await page.context.request.get(await frame.get_attribute("src") or "")
        policy = html.headers["content-security-policy"]
        assert "sandbox" in policy and "default-src 'none'" in policy
        assert "script-src" not in policy  # nothing allows a script
        # the page's script in the frame is blocked: Chromium logs that as a console error
        blocked = [e for e in problems.console if "sandboxed" not in e and "pwned" not in e]
        assert blocked == [], problems.console
