"""Screenshots of every dashboard page for docs/screenshots/, made by hand (never by pytest):

    TEST_REDIS_URL=redis://127.0.0.1:6379/12 python -m tests.screenshots

A dev stack in this process (the app, a worker, an SMTP sink that stores into the dev mail sink),
sample data (completed, failed, retried jobs; a 1,000-recipient newsletter; a source; a
schedule; mail), then Chromium (/usr/bin/chromium, through Playwright) at 1440x900 and 390x844,
each page at half scale, PNGs quantized by Pillow. It empties the Redis database it is given.
"""

from __future__ import annotations

import asyncio
import io
import sys
import tempfile
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session
from arq.connections import ArqRedis, RedisSettings, create_pool
from PIL import Image
from playwright.async_api import Browser, Page, ViewportSize, async_playwright

from app.mailsink import MaildirHandler, server_port, start_smtp_server
from app.web import create_app
from asyncjobs.settings import Settings
from tests.conftest import API_KEY, TEST_REDIS_URL, start_worker, stop_worker
from tests.dashboard.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS
from tests.dashboard.test_dashboard_layout import write_message
from tests.helpers import ApiClient, api_client
from tests.jobwait import wait_job

OUT = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
SIZES: dict[str, ViewportSize] = {
    "desktop": {"width": 1440, "height": 900},
    "phone": {"width": 390, "height": 844},
}
SCALE = 0.5  # small files: half the pixels each way
GONE = "gone@example.com"  # refused by the sink: a dead letter


class Sink(MaildirHandler):
    """The dev mail sink, refusing one address for good and another twice (then a retry)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.busy = {"busy@example.com": 2}

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address == GONE:
            return "550 5.1.1 Mailbox unavailable"
        if self.busy.get(address, 0) > 0:
            self.busy[address] -= 1
            return "451 4.3.0 Mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"


async def post(api: ApiClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await api.post(path, json=body)
    assert response.status in (201, 202), await response.text()
    answer: dict[str, Any] = await response.json()
    return answer


async def sample_data(api: ApiClient, mail_dir: Path) -> dict[str, str]:
    """Jobs of each outcome and the pages that show them."""
    email = {"subject": "Your invoice", "text": "Hello", "headers": {"X-Api-Key": "secret"}}
    done = await post(api, "/jobs/email", email | {"to": "Ada Lovelace <ada@example.com>"})
    retried = await post(api, "/jobs/email", email | {"to": "busy@example.com"})
    await post(api, "/jobs/email", email | {"to": GONE})
    readers = [{"email": f"reader{i}@example.com", "name": f"Reader {i}"} for i in range(1000)]
    newsletter = {"recipients": readers, "subject": "News", "text": "Hi {{ name }}"}
    letter = await post(api, "/jobs/newsletter", newsletter | {"delay_seconds": 3600})
    source = await post(api, "/sources", {"url": "https://example.com/", "schedule": "daily"})
    digest = {"type": "email", "body": email | {"to": "team@example.com"}}
    await post(api, "/schedules", {"name": "weekly digest", "cron": "0 9 * * 1", "job": digest})
    for job in (done, retried):
        await wait_job(api, job["job_id"])
    name = write_message(mail_dir)
    return {
        "job": f"/ui/jobs/{retried['job_id']}",
        "newsletter": f"/ui/jobs/{letter['job_id']}",
        "source": f"/ui/sources/{source['id']}",
        "mail-message": f"/ui/mail/{name}",
    }


async def shoot(browser: Browser, base: str, pages: dict[str, str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for size, viewport in SIZES.items():
        context = await browser.new_context(
            base_url=base,
            viewport=viewport,
            device_scale_factor=SCALE,
        )
        page = await context.new_page()
        await log_in(page)
        for name, url in pages.items():
            await page.goto(url)
            await page.wait_for_load_state("load")
            save(await page.screenshot(), OUT / f"{name}-{size}.png")
        await context.close()


async def log_in(page: Page) -> None:
    await page.goto("/ui/login")
    await page.fill("#key", API_KEY)
    await page.click("form.login button")
    await page.wait_for_url("**/ui")


def save(png: bytes, path: Path) -> None:
    """As a 256-colour PNG: a fifth of the size, and these pages have few colours anyway."""
    with Image.open(io.BytesIO(png)) as image:
        image.convert("RGB").quantize(colors=256).save(path, optimize=True)
    print(f"{path.relative_to(OUT.parents[1])}: {path.stat().st_size // 1024} KiB")


async def main() -> None:
    redis: ArqRedis = await create_pool(RedisSettings.from_dsn(TEST_REDIS_URL))
    await redis.flushdb()
    with tempfile.TemporaryDirectory() as folder:
        mail_dir = Path(folder) / "mail"
        smtp = await start_smtp_server(Sink(mail_dir))
        settings = Settings(
            _env_file=None,
            redis_url=TEST_REDIS_URL,
            api_keys=[API_KEY],
            smtp_host="127.0.0.1",
            smtp_port=server_port(smtp),
            mail_from="asyncjobs@example.com",
            mail_sink_dir=mail_dir,
            exports_dir=Path(folder) / "exports",
            email_retry_base_delay=0.05,
            email_retry_max_delay=0.5,
        )
        worker, task = await start_worker(settings)
        try:
            async with api_client(create_app(settings)) as api:
                details = await sample_data(api, mail_dir)
                async with async_playwright() as playwright:
                    browser = await playwright.chromium.launch(
                        executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
                    )
                    base = str(api.make_url(""))
                    pages = await nav_pages(browser, base) | details
                    await shoot(browser, base, pages)
                    await browser.close()
        finally:
            await stop_worker(worker, task)
            smtp.close()
            await redis.flushdb()
            await redis.aclose()


async def nav_pages(browser: Browser, base: str) -> dict[str, str]:
    """The header's pages, named by their path (overview for /ui)."""
    context = await browser.new_context(base_url=base)
    page = await context.new_page()
    await log_in(page)
    hrefs = await page.locator("header nav a").evaluate_all("links => links.map(a => a.pathname)")
    await context.close()
    return {(str(h).removeprefix("/ui").strip("/") or "overview"): str(h) for h in hrefs}


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
