"""The dashboard's bulk actions: retry or delete dead letters (selected, or all matching a
filter), abort selected queued jobs, run a schedule or a source now. Each is confirmed first,
CSRF-protected, bounded per request and safe when two operators act at once."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from aiohttp.test_utils import TestClient, TestServer
from arq.connections import ArqRedis
from arq.jobs import Job
from playwright.async_api import Dialog, Page, expect
from selectolax.lexbor import LexborHTMLParser

from app.bulkactions import BULK_MAX
from app.web import create_app
from asyncjobs.arqcompat import abort_jobs_ss
from asyncjobs.keys import QUOTA_KEY_PREFIX
from asyncjobs.settings import Settings
from jobs.deadletter import DeadLetter, add_dead_letters, get_dead_letter
from jobs.schedules import get_schedule, run_due_schedules
from tests.conftest import READ_KEY, start_worker, stop_worker
from tests.dashboard import test_dashboard_browser as in_browser
from tests.dashboard.test_dashboard import csrf_of, enqueue_email, log_in, ui
from tests.helpers import ApiClient, wait_for
from tests.jobwait import wait_job

browser, page = in_browser.browser, in_browser.page  # the Chromium fixtures
__all__ = ["browser", "page", "ui"]  # fixtures this module uses by name


def dead_letter(
    n: int, function: str = "send_email", error: str = "550 no such user"
) -> DeadLetter:
    email = {"to": [f"r{n}@example.com"], "subject": f"Message {n}", "text": "Hi"}
    return DeadLetter(
        id=f"dead-{function}-{n}",
        function=function,
        arguments={"email": email, "message_id": f"<{n}@example.com>"},
        error=error,
        reason="permanent",
        tries=1,
        enqueue_time=None,
        failed_at=datetime.now(UTC) - timedelta(seconds=n),
    )


async def queued_jobs(redis: ArqRedis, settings: Settings) -> list[Job]:
    ids = await redis.zrange(settings.queue_name, 0, -1)
    return [Job(job_id.decode(), redis) for job_id in ids]


async def arguments_of(jobs: list[Job]) -> list[dict[str, Any]]:
    infos = [await job.info() for job in jobs]
    return [info.kwargs for info in infos if info is not None]


def summary_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def hidden_ids(html: str) -> list[str]:
    """The ids a confirmation page carries (one field: a form may have 1,000 at most)."""
    found = re.search(r'<input type="hidden" name="ids" value="([^"]*)">', html)
    assert found, "no ids on the confirmation page"
    return found.group(1).split()


# -- dead letters --


@pytest.mark.slow
async def test_bulk_retry_of_50_dead_letters_in_chromium(
    page: Page, redis: ArqRedis, settings: Settings
) -> None:
    entries = [dead_letter(n) for n in range(50)]
    await add_dead_letters(redis, entries)
    await in_browser.log_in(page)
    await page.goto("/ui/dead-letter")
    await expect(page.locator("tr[data-entry-id]")).to_have_count(50)

    await page.check("input[data-select-all]")
    await expect(page.locator('input[name="id"]:checked')).to_have_count(50)
    await page.click('button[value="retry-selected"]')
    await expect(page.locator("h1")).to_have_text("Retry 50 dead letters?")
    assert await redis.zcard(settings.queue_name) == 0, "retried before the confirmation"
    await page.click("#bulk-confirm button", timeout=in_browser.TIMEOUT_MS)

    await expect(page.locator("#bulk-result")).to_have_text("Retried 50, 0 failed.")
    await expect(page.locator("tr[data-entry-id]")).to_have_count(0)
    await expect(page.locator("tr.empty")).to_contain_text("No dead letters")
    jobs = await queued_jobs(redis, settings)
    assert len(jobs) == 50 and not {job.job_id for job in jobs} & {e.id for e in entries}
    assert sorted(a["message_id"] for a in await arguments_of(jobs)) == sorted(
        e.arguments["message_id"] for e in entries
    )
    assert await redis.zcard("asyncjobs:dead") == 0


async def test_delete_all_that_match_a_filter(ui: ApiClient, redis: ArqRedis) -> None:
    gone = [dead_letter(n, "scrape", "HTTP 404 Not Found") for n in range(10)]
    kept = [dead_letter(n, "scrape", "timeout") for n in range(10, 20)]
    kept += [dead_letter(n, "send_email", "550 HTTP 404 is not a mailbox") for n in range(10)]
    await add_dead_letters(redis, gone + kept)
    csrf = await log_in(ui)

    listed = await (await ui.get("/ui/dead-letter?function=scrape&error=http+404")).text()
    assert len(re.findall(r'<tr data-entry-id="dead-scrape-', listed)) == 10
    assert "Delete all 10 matching" in listed and "dead-send_email" not in listed

    form = {"csrf": csrf, "op": "delete-matching", "function": "scrape", "error": "http 404"}
    confirm = await ui.post("/ui/dead-letter/bulk", data=form)
    page = await confirm.text()
    assert confirm.status == 200 and "Delete 10 dead letters?" in page
    assert sorted(hidden_ids(page)) == sorted(e.id for e in gone)
    assert await redis.zcard("asyncjobs:dead") == 30, "deleted before the confirmation"

    yes = {"csrf": csrf_of(page), "confirmed": "1", "action": "delete", "function": "scrape",
           "error": "http 404", "ids": " ".join(hidden_ids(page))}  # fmt: skip
    done = await ui.post("/ui/dead-letter/bulk", data=_multi(yes), allow_redirects=False)
    assert done.status == 303
    assert summary_of(done.headers["Location"]) == {
        "function": "scrape", "error": "http 404", "did": "delete", "done": "10", "missing": "0",
        "failed": "0",
    }  # fmt: skip
    shown = await (await ui.get(done.headers["Location"])).text()
    assert "Deleted 10." in shown and "No dead letters match" in shown
    assert await redis.zcard("asyncjobs:dead") == 20
    for entry in kept:
        assert await get_dead_letter(redis, entry.id) is not None


def _multi(form: dict[str, Any]) -> list[tuple[str, str]]:
    """A form body with repeated fields (`id`, once per id)."""
    pairs = []
    for name, value in form.items():
        pairs += [(name, v) for v in value] if isinstance(value, list) else [(name, value)]
    return pairs


async def test_one_request_acts_on_at_most_1000(ui: ApiClient, redis: ArqRedis) -> None:
    await add_dead_letters(redis, [dead_letter(n) for n in range(BULK_MAX + 5)])
    csrf = await log_in(ui)
    confirm = await ui.post("/ui/dead-letter/bulk", data={"csrf": csrf, "op": "retry-matching"})
    page = await confirm.text()
    assert "Retry 1,000 dead letters?" in page and "first 1,000 of the 1,005" in page
    assert len(hidden_ids(page)) == BULK_MAX

    too_many = [f"dead-send_email-{n}" for n in range(BULK_MAX + 1)]
    form = {"csrf": csrf, "confirmed": "1", "action": "retry", "ids": " ".join(too_many)}
    refused = await ui.post("/ui/dead-letter/bulk", data=form, allow_redirects=False)
    assert refused.status == 413 and "at most 1000" in await refused.text()
    assert await redis.zcard("asyncjobs:dead") == BULK_MAX + 5


async def test_bulk_actions_need_the_csrf_token(
    ui: ApiClient, api: ApiClient, redis: ArqRedis, settings: Settings
) -> None:
    await add_dead_letters(redis, [dead_letter(n) for n in range(3)])
    job_id = await enqueue_email(api)  # no worker: it stays queued
    schedule = await _schedule(api, every=3600)
    await log_in(ui)
    ids = [("id", f"dead-send_email-{n}") for n in range(3)]
    posts = {
        "/ui/dead-letter/bulk": [("confirmed", "1"), ("action", "delete"), *ids],
        "/ui/queued/abort": [("confirmed", "1"), ("id", job_id)],
        f"/ui/schedules/{schedule['id']}/run": [],
    }
    for path, form in posts.items():
        for token in ([], [("csrf", "")], [("csrf", "A" * 43)]):
            response = await ui.post(path, data=form + token, allow_redirects=False)
            assert response.status == 403, (path, token)
            assert "CSRF" in await response.text()
    assert await redis.zcard("asyncjobs:dead") == 3
    assert await redis.zscore(abort_jobs_ss, job_id) is None
    assert await redis.zcard(settings.queue_name) == 1  # the email alone: no run


async def test_a_read_only_key_sees_the_buttons_disabled_and_cannot_act(
    ui: ApiClient, redis: ArqRedis
) -> None:
    await add_dead_letters(redis, [dead_letter(n) for n in range(3)])
    csrf = await log_in(ui, READ_KEY)
    page = LexborHTMLParser(await (await ui.get("/ui/dead-letter")).text())
    buttons = page.css("#bulk button")
    assert len(buttons) == 4 and all("disabled" in b.attributes for b in buttons)
    form = {"csrf": csrf, "confirmed": "1", "action": "delete", "ids": "dead-send_email-0"}
    response = await ui.post("/ui/dead-letter/bulk", data=form, allow_redirects=False)
    assert response.status == 403 and "read-only" in await response.text()
    assert await redis.zcard("asyncjobs:dead") == 3


async def test_two_concurrent_bulk_retries_enqueue_each_entry_once(
    ui: ApiClient, redis: ArqRedis, settings: Settings
) -> None:
    entries = [dead_letter(n) for n in range(20)]
    await add_dead_letters(redis, entries)
    csrf = await log_in(ui)
    async with TestClient(TestServer(create_app(settings), host="127.0.0.1")) as other:
        other_csrf = await log_in(other)  # a second operator, a session of their own
        forms = [
            _multi(
                {"csrf": token, "confirmed": "1", "action": "retry", "id": [e.id for e in entries]}
            )
            for token in (csrf, other_csrf)
        ]
        both = await asyncio.gather(
            ui.post("/ui/dead-letter/bulk", data=forms[0], allow_redirects=False),
            other.post("/ui/dead-letter/bulk", data=forms[1], allow_redirects=False),
        )
    summaries = [summary_of(response.headers["Location"]) for response in both]
    assert sum(int(s["done"]) for s in summaries) == 20
    assert sum(int(s["missing"]) for s in summaries) == 20
    assert all(s["failed"] == "0" for s in summaries)
    jobs = await queued_jobs(redis, settings)
    assert len(jobs) == 20
    message_ids = sorted(a["message_id"] for a in await arguments_of(jobs))
    assert message_ids == sorted(e.arguments["message_id"] for e in entries)


# -- queued jobs --


async def test_abort_selected_queued_jobs(
    ui: ApiClient, api: ApiClient, redis: ArqRedis, settings: Settings
) -> None:
    queued = [await enqueue_email(api, subject=f"S{n}") for n in range(4)]
    deferred = await enqueue_email(api, delay_seconds=3600)
    csrf = await log_in(ui)
    listed = await (await ui.get("/ui/queued")).text()
    for job_id in [*queued, deferred]:
        assert f'<tr data-job-id="{job_id}">' in listed

    chosen = [queued[0], queued[1], deferred]
    form = _multi({"csrf": csrf, "id": chosen})
    confirm = await ui.post("/ui/queued/abort", data=form)
    page = await confirm.text()
    assert "Abort 3 jobs?" in page and sorted(hidden_ids(page)) == sorted(chosen)
    assert await redis.zcard(abort_jobs_ss) == 0, "aborted before the confirmation"

    yes = {"csrf": csrf_of(page), "confirmed": "1", "ids": " ".join(hidden_ids(page))}
    done = await ui.post("/ui/queued/abort", data=yes, allow_redirects=False)
    summary = summary_of(done.headers["Location"])
    assert (summary["did"], summary["done"], summary["missing"]) == ("abort", "3", "0")
    shown = await (await ui.get(done.headers["Location"])).text()
    assert "Asked to abort 3." in shown
    assert sorted(m.decode() for m in await redis.zrange(abort_jobs_ss, 0, -1)) == sorted(chosen)

    worker, task = await start_worker(settings, cron_jobs=[])
    try:
        statuses = {job_id: (await wait_job(api, job_id))["status"] for job_id in queued}
        statuses[deferred] = (await wait_job(api, deferred))["status"]  # made due: at once
    finally:
        await stop_worker(worker, task)
    assert statuses == {queued[0]: "aborted", queued[1]: "aborted", deferred: "aborted",
                        queued[2]: "complete", queued[3]: "complete"}  # fmt: skip

    again = await ui.post("/ui/queued/abort", data=yes, allow_redirects=False)
    assert summary_of(again.headers["Location"])["missing"] == "3"  # finished: left alone


# -- run now --


async def _schedule(api: ApiClient, **fields: Any) -> dict[str, Any]:
    email = {"to": ["a@example.com", "b@example.com"], "subject": "Digest", "text": "x"}
    body = {"name": "digest", "job": {"type": "email", "body": email}} | fields
    response = await api.post("/schedules", json=body)
    assert response.status == 201, await response.text()
    created: dict[str, Any] = await response.json()
    return created


async def _tokens(redis: ArqRedis, owner: str) -> float:
    return float(await redis.hget(f"{QUOTA_KEY_PREFIX}messages:{owner}", "tokens"))  # type: ignore[misc]


@pytest.fixture
def settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Settings:
    """Ten messages per hour: a run of the test schedule is two."""
    return make_settings(
        mail_messages_per_hour=10, newsletter_max_recipients=10, exports_dir=tmp_path / "exports"
    )


async def test_run_a_schedule_now_through_the_api(
    api: ApiClient, redis: ArqRedis, settings: Settings
) -> None:
    created = await _schedule(api, every=3600)
    schedule = await get_schedule(redis, created["id"])
    assert schedule is not None and schedule.owner
    tick = schedule.period_start(schedule.created_at) + timedelta(seconds=3600)
    assert await run_due_schedules(redis, settings, tick) == [schedule.id]  # the period's run
    assert await _tokens(redis, schedule.owner) == pytest.approx(8, abs=0.1)

    response = await api.post(f"/schedules/{schedule.id}/run")
    assert response.status == 202, await response.text()
    accepted = await response.json()
    assert len(accepted["job_ids"]) == 1
    assert accepted["job_ids"][0].startswith(f"schedule:{schedule.id}:now-")
    assert list(map(unquote, accepted["status_urls"])) == [f"/jobs/{accepted['job_ids'][0]}"]
    assert accepted["runs_url"] == f"/schedules/{schedule.id}/runs"
    assert await _tokens(redis, schedule.owner) == pytest.approx(6, abs=0.1)
    # the period's run is still its own: a second tick in the period enqueues nothing more
    assert await run_due_schedules(redis, settings, tick + timedelta(seconds=5)) == []
    assert await redis.zcard(settings.queue_name) == 2

    runs = (await (await api.get(accepted["runs_url"])).json())["runs"]
    assert [run["manual"] for run in runs] == [True, False]
    assert [job["job_id"] for job in runs[0]["jobs"]] == accepted["job_ids"]
    assert runs[0]["jobs"][0]["status"] == "queued"

    for _ in range(3):  # 6 messages left: three runs of two
        assert (await api.post(f"/schedules/{schedule.id}/run")).status == 202
    refused = await api.post(f"/schedules/{schedule.id}/run")
    assert refused.status == 429 and int(refused.headers["Retry-After"]) >= 1
    assert "quota" in (await refused.json())["message"]
    assert await redis.zcard(settings.queue_name) == 5  # the refused run enqueued nothing
    assert (await api.post(f"/schedules/{'0' * 32}/run")).status == 404


async def test_run_a_schedule_now_with_the_cron_pages_button(
    ui: ApiClient, api: ApiClient, redis: ArqRedis, settings: Settings
) -> None:
    created = await _schedule(api, cron="0 9 * * 1", timezone="Europe/Paris")
    await api.post(f"/schedules/{created['id']}/pause")  # run now works when paused too
    csrf = await log_in(ui)
    cron = LexborHTMLParser(await (await ui.get("/ui/cron")).text())
    form = cron.css_first(f'tr[data-schedule="{created["id"]}"] form.run-now')
    assert form is not None and "now" in (form.attributes.get("data-confirm") or "")
    action = form.attributes["action"]
    assert action == f"/ui/schedules/{created['id']}/run"

    response = await ui.post(action, data={"csrf": csrf}, allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == "/ui/cron"
    runs = (await (await api.get(f"/schedules/{created['id']}/runs")).json())["runs"]
    assert len(runs) == 1 and runs[0]["manual"] and len(runs[0]["jobs"]) == 1
    assert await _tokens(redis, created["owner"]) == pytest.approx(8, abs=0.1)
    page = LexborHTMLParser(await (await ui.get("/ui/cron")).text())
    cell = page.css_first(f'tr[data-schedule="{created["id"]}"] td.last-run')
    assert cell is not None and "(run now)" in cell.text()
    link = cell.css_first("a")
    assert (
        link is not None
        and unquote(link.attributes["href"] or "") == f"/ui/jobs/{runs[0]['jobs'][0]['job_id']}"
    )


@pytest.mark.slow
async def test_run_now_buttons_ask_first_in_chromium(
    page: Page, api: ApiClient, redis: ArqRedis
) -> None:
    created = await _schedule(api, every=3600)
    await in_browser.log_in(page)
    await page.goto("/ui/cron")
    button = page.locator(f'tr[data-schedule="{created["id"]}"] form.run-now button')
    questions: list[str] = []

    async def dismiss(dialog: Dialog) -> None:
        questions.append(dialog.message)
        await dialog.dismiss()

    async def accept(dialog: Dialog) -> None:
        questions.append(dialog.message)
        await dialog.accept()

    async def asked() -> bool:
        return bool(questions)

    page.once("dialog", dismiss)
    await button.click()
    await wait_for(asked, what="the confirmation")
    assert await redis.llen(f"asyncjobs:schedule:{created['id']}:runs") == 0  # type: ignore[misc]

    page.once("dialog", accept)
    await button.click()
    cell = page.locator(f'tr[data-schedule="{created["id"]}"] td.last-run')
    await expect(cell).to_contain_text("(run now)")
    assert questions == ["Run the schedule digest now, besides its next runs?"] * 2


async def test_run_a_source_from_the_sources_list(
    ui: ApiClient,
    api: ApiClient,
    redis: ArqRedis,
    settings: Settings,
    crawl_site: tuple[int, Any],
) -> None:
    port, _ = crawl_site
    source = {"url": f"http://127.0.0.1:{port}/news", "schedule": "daily"}
    source_id = (await (await api.post("/sources", json=source)).json())["id"]
    csrf = await log_in(ui)
    listing = LexborHTMLParser(await (await ui.get("/ui/sources")).text())
    form = listing.css_first(f'tr[data-source-id="{source_id}"] form.run-now')
    assert form is not None and form.attributes.get("data-confirm")
    worker, task = await start_worker(settings, cron_jobs=[])
    try:
        ran = await ui.post(form.attributes["action"] or "", data={"csrf": csrf})
        assert ran.status == 200 and ran.url.path == f"/ui/sources/{source_id}"

        async def finished() -> str | None:
            page = await (await ui.get(f"/ui/sources/{source_id}")).text()
            row = re.search(r"<tr data-run-id=.*?</tr>", page, re.DOTALL)
            return row.group(0) if row and "finished" in row.group(0) else None

        row = await wait_for(finished, timeout=30, what="the source's run to finish")
    finally:
        await stop_worker(worker, task)
    assert "manual" in row
