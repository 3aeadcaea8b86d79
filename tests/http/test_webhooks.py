"""Completion webhooks against real loopback receivers: signed, retried, guarded, recorded."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from arq.connections import ArqRedis

from asyncjobs.settings import Settings
from asyncjobs.signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, verify_request
from tests.conftest import AUTH, api_and_worker
from tests.helpers import ApiClient, wait_for
from tests.servers import SiteStats

SECRET = "test-webhook-secret"
EMAIL = {"to": "someone@example.com", "subject": "Hi", "text": "Hello"}


@dataclass
class Receiver:
    """A webhook endpoint that checks each signature (HMAC over the timestamp and the body,
    asyncjobs.signing) and answers `fail_first` 500s first."""

    fail_first: int = 0
    calls: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        signed = verify_request(SECRET, request.headers, body)
        timestamp = int(request.headers[TIMESTAMP_HEADER])
        signature = request.headers[SIGNATURE_HEADER]
        self.calls.append({"signed": signed, "payload": json.loads(body), "body": body,
                           "timestamp": timestamp, "signature": signature})  # fmt: skip
        if len(self.calls) <= self.fail_first:
            return web.Response(status=500, text="not yet")
        return web.Response(status=204 if signed else 401)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    hook.url = f"http://127.0.0.1:{server.port}/hook"
    yield hook
    await server.close()


@pytest.fixture
async def hooked(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> AsyncIterator[tuple[ApiClient, Settings]]:
    """The API and a worker with WEBHOOK_SECRET set."""
    settings = make_settings(webhook_secret=SECRET)
    async with api_and_worker(settings) as client:
        yield client, settings


async def callback_of(api: ApiClient, job_id: str, state: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        view = await (await api.get(f"/jobs/{job_id}", headers=AUTH)).json()
        callback = view.get("callback")
        return view if callback and callback["state"] == state else None

    return await wait_for(check, what=f"job {job_id}'s callback to be {state}")


async def test_a_finished_job_posts_a_signed_webhook(
    hooked: tuple[ApiClient, Settings], receiver: Receiver, site: tuple[str, SiteStats]
) -> None:
    api, _ = hooked
    base, _ = site
    body = {"url": f"{base}/page/1", "callback_url": receiver.url}
    job_id = (await (await api.post("/jobs/scrape", json=body, headers=AUTH)).json())["job_id"]
    view = await callback_of(api, job_id, "delivered")
    assert view["status"] == "complete"
    assert view["callback"]["tries"] == 1 and view["callback"]["last_status"] == 204
    [call] = receiver.calls
    assert call["signed"] and abs(call["timestamp"] - time.time()) < 60
    # the signature is HMAC-SHA256 of "<timestamp>." + the raw body: the timestamp is signed
    assert call["signature"] == sign(SECRET, call["timestamp"], call["body"])
    assert call["signature"] != sign(SECRET, call["timestamp"] + 1, call["body"])
    assert call["payload"]["job_id"] == job_id and call["payload"]["status"] == "complete"
    assert call["payload"]["result"]["url"] == f"{base}/page/1"


async def test_a_failing_receiver_is_retried_until_it_accepts(
    hooked: tuple[ApiClient, Settings], receiver: Receiver
) -> None:
    """Fails twice, then accepts: three POSTs of the same signed body."""
    api, _ = hooked
    receiver.fail_first = 2
    body = {**EMAIL, "callback_url": receiver.url}
    job_id = (await (await api.post("/jobs/email", json=body, headers=AUTH)).json())["job_id"]
    view = await callback_of(api, job_id, "delivered")
    assert view["callback"]["tries"] == 3
    assert [c["signed"] for c in receiver.calls] == [True, True, True]
    assert len({json.dumps(c["payload"], sort_keys=True) for c in receiver.calls}) == 1
    assert receiver.calls[0]["payload"]["status"] == view["status"] == "complete"


async def test_a_job_that_fails_for_good_reports_its_error(
    hooked: tuple[ApiClient, Settings], receiver: Receiver, site: tuple[str, SiteStats]
) -> None:
    api, _ = hooked
    base, _ = site
    body = {"url": f"{base}/missing", "callback_url": receiver.url}
    job_id = (await (await api.post("/jobs/scrape", json=body, headers=AUTH)).json())["job_id"]
    await callback_of(api, job_id, "delivered")
    [call] = receiver.calls
    assert call["payload"]["status"] == "failed"
    assert "404" in call["payload"]["error"]


async def test_an_aborted_job_reports_aborted(
    hooked: tuple[ApiClient, Settings], receiver: Receiver, site: tuple[str, SiteStats]
) -> None:
    api, _ = hooked
    base, stats = site
    body = {"url": f"{base}/page/2", "delay_seconds": 3600, "callback_url": receiver.url}
    job_id = (await (await api.post("/jobs/scrape", json=body, headers=AUTH)).json())["job_id"]
    assert (await api.delete(f"/jobs/{job_id}", headers=AUTH)).status == 202
    await callback_of(api, job_id, "delivered")
    assert receiver.calls[0]["payload"]["status"] == "aborted"
    assert stats.hits.get("/page/2", 0) == 0


async def test_callbacks_go_through_the_ssrf_guard(
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    receiver: Receiver,
    site: tuple[str, SiteStats],
) -> None:
    """Loopback not allowed (the default): the webhook is refused, never sent, and recorded
    as failed; the job it reports on is unaffected."""
    guarded = make_settings(webhook_secret=SECRET, scrape_allowed_cidrs=[])
    async with api_and_worker(guarded) as api:
        body = {**EMAIL, "callback_url": receiver.url}
        response = await api.post("/jobs/email", json=body, headers=AUTH)
        job_id = (await response.json())["job_id"]
        view = await callback_of(api, job_id, "failed")
    assert receiver.calls == []
    assert "not a public address" in view["callback"]["last_error"]
