"""`after`, `allow_failure` and `then` end to end, over real HTTP with a real worker: from the
client (Client and SyncClient against the real app on loopback), and a built-in following a
job with its result (an email after an export gets the export's file attached)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import pytest
from arq.connections import ArqRedis

from asyncjobs import JobContext, job
from asyncjobs.client import Client, JobFailed, SyncClient, ValidationFailed
from asyncjobs.errors import PermanentJobError
from asyncjobs.registry import unregister
from asyncjobs.settings import Settings
from tests.conftest import API_KEY, api_and_worker
from tests.helpers import ApiClient
from tests.jobwait import wait_job
from tests.servers import RecordingSmtpHandler, SiteStats


async def double(ctx: JobContext, n: int) -> int:
    if n < 0:
        raise PermanentJobError("negative")
    return 2 * n


async def show(ctx: JobContext, label: str = "", previous: Any = None) -> str:
    return f"{label}:{previous}"


async def page_title(ctx: JobContext, label: str, previous: Any = None) -> str:
    """A follow-up of a scrape: what it read of the scrape's result."""
    return f"{label}:{previous['title']} at {previous['url']}" if previous else f"{label}:-"


@pytest.fixture
async def served(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> AsyncIterator[ApiClient]:
    job(name="double", tries=1)(double)
    job(name="show", tries=1)(show)
    job(name="page_title", tries=1)(page_title)
    try:
        async with api_and_worker(make_settings()) as api:
            yield api
    finally:
        unregister("double")
        unregister("show")
        unregister("page_title")


async def test_the_client_sends_after_allow_failure_and_then(served: ApiClient) -> None:
    base = str(served.make_url("/"))
    async with Client(base, API_KEY) as client:
        parent = await client.enqueue("double", n=4, then={"type": "show", "body": {"label": "t"}})
        assert await client.wait(parent + "-then", timeout=15) == "t:8"  # the parent's result
        bad = await client.enqueue("double", n=-1)
        cancelled = await client.enqueue("show", after=[parent, bad])
        with pytest.raises(JobFailed, match=f"cancelled: job {bad} failed"):
            await client.wait(cancelled, timeout=15)
        anyway = await client.enqueue("show", label="a", after=[bad], allow_failure=True)
        assert await client.wait(anyway, timeout=15) == "a:None"
        with pytest.raises(ValidationFailed, match="no job nobody"):
            await client.enqueue("show", after=["nobody"])
        with pytest.raises(TypeError):
            await client.enqueue("show", after=parent)  # one id is not a list of ids

    def sync_side() -> Any:
        with SyncClient(base, API_KEY) as sync:
            child = sync.enqueue("show", label="s", after=[parent], allow_failure=True)
            return sync.wait(child, timeout=15)

    assert await asyncio.to_thread(sync_side) == "s:None"  # `after` hands nothing over


async def test_an_email_after_an_export_has_the_export_attached(
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    smtp: tuple[RecordingSmtpHandler, int],
) -> None:
    email = {"to": "ada@example.com", "subject": "Your export", "text": "Attached."}
    async with api_and_worker(make_settings()) as api:
        response = await api.post(
            "/jobs/export", json={"format": "csv", "then": {"type": "email", "body": email}}
        )
        assert response.status == 202, await response.text()
        accepted = await response.json()
        export = await wait_job(api, accepted["job_id"])
        assert export["status"] == "complete", export
        sent = await wait_job(api, accepted["job_id"] + "-then")
        assert sent["status"] == "complete", sent
        download = await api.get(accepted["download_url"])
        expected = await download.read()
    [message] = smtp[0].messages
    assert message.message["Subject"] == "Your export"
    [attached] = list(message.message.iter_attachments())
    name = export["result"]["name"]
    assert attached.get_filename() == name and accepted["download_url"].endswith(name)
    assert attached.get_content_type() == "text/csv"
    assert attached.get_payload(decode=True) == expected


async def test_an_email_after_another_job_ignores_its_result(
    served: ApiClient, smtp: tuple[RecordingSmtpHandler, int]
) -> None:
    email = {"to": "ada@example.com", "subject": "After", "text": "No file."}
    response = await served.post(
        "/jobs/double", json={"n": 2, "then": {"type": "email", "body": email}}
    )
    assert response.status == 202, await response.text()
    sent = await wait_job(served, (await response.json())["job_id"] + "-then")
    assert sent["status"] == "complete", sent
    [message] = smtp[0].messages
    assert not list(message.message.iter_attachments())


async def test_a_then_email_is_charged_its_messages(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> None:
    """MAIL_MESSAGES_PER_HOUR 2: a `then` email to 3 never fits; an email followed by an
    email, one recipient each, takes both; the next email waits (429)."""
    quota = {"mail_messages_per_hour": 2, "newsletter_max_recipients": 2, "mail_max_recipients": 3}
    three = {"to": ["a@example.com", "b@example.com", "c@example.com"], "subject": "S", "text": "t"}
    one = {"to": "a@example.com", "subject": "S", "text": "t"}
    async with api_and_worker(make_settings(**quota)) as api:
        response = await api.post(
            "/jobs/export", json={"format": "csv", "then": {"type": "email", "body": three}}
        )
        assert response.status == 422, await response.text()
        response = await api.post(
            "/jobs/email", json=one | {"then": {"type": "email", "body": one}}
        )
        assert response.status == 202, await response.text()
        assert (await api.post("/jobs/email", json=one)).status == 429


async def test_a_scrape_of_one_url_takes_after_and_then(
    served: ApiClient, site: tuple[str, SiteStats]
) -> None:
    """A single-URL scrape is one job as any other: a follow-up gets its result, and it can
    wait for another job; a batch of `urls` refuses both, pointing at its callback."""
    base, stats = site
    then = {"type": "page_title", "body": {"label": "t"}}
    response = await served.post("/jobs/scrape", json={"url": f"{base}/page/1", "then": then})
    assert response.status == 202, await response.text()
    first = (await response.json())["job_id"]
    followed = await wait_job(served, first + "-then")
    assert followed["status"] == "complete", followed
    assert followed["result"] == f"t:Test page 1 at {base}/page/1"  # the scrape's result

    response = await served.post("/jobs/double", json={"n": 3, "delay_seconds": 0.5})
    parent = (await response.json())["job_id"]
    response = await served.post("/jobs/scrape", json={"url": f"{base}/page/2", "after": [parent]})
    assert response.status == 202, await response.text()
    second = (await response.json())["job_id"]
    assert (await (await served.get(f"/jobs/{second}")).json())["status"] == "waiting"
    assert "/page/2" not in stats.hits  # not before its parent
    scraped, waited_for = await wait_job(served, second), await wait_job(served, parent)
    assert scraped["status"] == waited_for["status"] == "complete", (scraped, waited_for)
    started, parent_ended = (
        datetime.fromisoformat(t) for t in (scraped["start_time"], waited_for["finish_time"])
    )
    assert started >= parent_ended
    assert stats.hits["/page/2"] == 1

    urls = [f"{base}/page/3", f"{base}/page/4"]
    for option in ({"then": then}, {"after": [parent]}):
        response = await served.post("/jobs/scrape", json={"urls": urls} | option)
        assert response.status == 422
        assert "not with a batch of 'urls'" in await response.text()
        assert "'callback'" in await response.text()
    assert "/page/3" not in stats.hits
