"""Uploaded images in Redis: kept for their job only, and counted against their API key's
held bytes (UPLOAD_MAX_BYTES_PER_KEY), with the real API and a real worker. Every check of what
Redis holds reads Redis itself: the upload's key, and the key's charge (its items and total)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest
from aiohttp import FormData
from arq.connections import ArqRedis

from app.web import create_app
from asyncjobs.keys import DEAD_KEY_PREFIX, QUOTA_KEY_PREFIX, UPLOAD_KEY_PREFIX
from asyncjobs.settings import Settings
from jobs.images import upload_life
from tests.conftest import API_KEY, AUTH, start_worker, stop_worker
from tests.helpers import ApiClient, api_client, wait_for
from tests.housekeeping.test_images import picture, png_header_only
from tests.jobwait import wait_job

KEY_ID = hashlib.sha256(API_KEY.encode()).hexdigest()[:12]  # app/auth.py's id of the test key
HELD = f"{QUOTA_KEY_PREFIX}upload-bytes:{KEY_ID}"  # zset: upload id -> expiry (ms)
IMAGE = picture(300, 300, "PNG", "RGBA")


async def held_bytes(redis: ArqRedis) -> int:
    """The key's charge as Redis has it (no expired items pruned: the raw total)."""
    return int(await redis.get(HELD + ":total") or 0)


async def upload(
    api: ApiClient, data: bytes, options: dict[str, Any] | None = None, **outputs: Any
) -> Any:
    form = FormData()
    form.add_field("image", data, filename="upload.png", content_type="image/png")
    if outputs:
        form.add_field("outputs", json.dumps(outputs["outputs"]))
    if options is not None:
        form.add_field("options", json.dumps(options))
    return await api.post("/jobs/image", data=form, headers=AUTH)


async def accepted(api: ApiClient, data: bytes, **kwargs: Any) -> str:
    response = await upload(api, data, **kwargs)
    assert response.status == 202, await response.text()
    job_id: str = (await response.json())["job_id"]
    return job_id


@contextlib.asynccontextmanager
async def worker_running(settings: Settings) -> AsyncIterator[None]:
    worker, task = await start_worker(settings, cron_jobs=[])
    try:
        yield
    finally:
        await stop_worker(worker, task)


@pytest.fixture
async def api_only(
    make_settings: Callable[..., Settings], redis: ArqRedis
) -> AsyncIterator[Callable[..., Any]]:
    """The API with settings of the test's choosing, and no worker until the test starts one."""
    stack = contextlib.AsyncExitStack()

    async def build(**overrides: Any) -> tuple[ApiClient, Settings]:
        settings = make_settings(**overrides)
        client = await stack.enter_async_context(api_client(create_app(settings)))
        return client, settings

    async with stack:
        yield build


async def test_an_upload_is_held_until_its_job_completes_then_gone(
    api_only: Callable[..., Any], redis: ArqRedis
) -> None:
    api, settings = await api_only()
    job_id = await accepted(api, IMAGE)
    assert await redis.exists(UPLOAD_KEY_PREFIX + job_id) == 1
    assert await held_bytes(redis) == len(IMAGE)
    assert await redis.zscore(HELD, job_id) is not None
    async with worker_running(settings):
        status = await wait_job(api, job_id)
    assert status["status"] == "complete", status
    assert status["result"]["source_bytes"] == len(IMAGE)
    assert await redis.exists(UPLOAD_KEY_PREFIX + job_id) == 0
    assert await held_bytes(redis) == 0
    assert await redis.zcard(HELD) == 0


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"GIF89a, or so it says: not an image at all", "not an image"),
        (png_header_only(100_000, 100_000), "more than 20,000,000 pixels"),
    ],
    ids=["not-an-image", "too-many-pixels"],
)
async def test_an_upload_whose_job_fails_for_good_is_gone(
    api_only: Callable[..., Any], redis: ArqRedis, data: bytes, error: str
) -> None:
    api, settings = await api_only(image_max_pixels=20_000_000)
    job_id = await accepted(api, data)
    assert await held_bytes(redis) == len(data)
    async with worker_running(settings):
        status = await wait_job(api, job_id)
    assert status["status"] == "failed" and status["tries"] == 1, status
    assert error in status["error"]
    assert await redis.exists(DEAD_KEY_PREFIX + job_id) == 1  # dead-lettered, then cleaned
    assert await redis.exists(UPLOAD_KEY_PREFIX + job_id) == 0
    assert await held_bytes(redis) == 0
    assert await redis.zcard(HELD) == 0


async def test_an_upload_whose_job_is_aborted_while_it_runs_is_gone(
    api_only: Callable[..., Any], redis: ArqRedis
) -> None:
    """Ten full-size WebP versions of a 4000 x 4000 image: seconds of work, aborted midway."""
    big = picture(4000, 4000, "PNG")
    api, settings = await api_only(cpu_limit_seconds=120)
    outputs = [{"format": "webp", "quality": 100}] * 10
    job_id = await accepted(api, big, outputs=outputs)
    assert await held_bytes(redis) == len(big)
    async with worker_running(settings):

        async def running() -> bool:
            body = await (await api.get(f"/jobs/{job_id}")).json()
            return bool(body["status"] == "in_progress")

        await wait_for(running, what="the image job to start")
        assert (await api.delete(f"/jobs/{job_id}", headers=AUTH)).status == 202
        status = await wait_job(api, job_id)
    assert status["status"] == "aborted", status
    assert await redis.exists(UPLOAD_KEY_PREFIX + job_id) == 0
    assert await held_bytes(redis) == 0


@pytest.mark.slow
async def test_an_upload_outlives_its_worker_stopping_midway(
    api_only: Callable[..., Any], redis: ArqRedis
) -> None:
    """A stopping worker cancels its jobs too, but they run again elsewhere: that is no abort,
    and the upload must still be there for the next try."""
    big = picture(4000, 4000, "PNG")
    api, settings = await api_only(cpu_limit_seconds=120, shutdown_grace=0)
    job_id = await accepted(api, big, outputs=[{"format": "webp", "quality": 100}] * 4)

    async def status() -> str:
        body = await (await api.get(f"/jobs/{job_id}")).json()
        return str(body["status"])

    async def started() -> bool:
        return await status() == "in_progress"

    # as if it had waited in the queue: 100 s of its life left, then a try gives it a life again
    key = UPLOAD_KEY_PREFIX + job_id
    await redis.pexpire(key, 100_000)
    seconds, _ = await redis.time()
    await redis.zadd(HELD, {job_id: seconds * 1000 + 100_000}, xx=True)
    async with worker_running(settings):
        await wait_for(started, what="the image job to start")
        seconds, _ = await redis.time()
        expiry_ms = await redis.zscore(HELD, job_id)
        assert expiry_ms is not None and expiry_ms > seconds * 1000 + 500_000
        assert await redis.pttl(key) > 500_000
    assert await status() in {"queued", "in_progress"}  # not finished: it runs again
    assert await redis.exists(key) == 1
    assert await held_bytes(redis) == len(big)
    async with worker_running(settings):
        finished = await wait_job(api, job_id, timeout=60)
    assert finished["status"] == "complete", finished
    assert await redis.exists(key) == 0
    assert await held_bytes(redis) == 0


async def test_a_keys_uploads_hold_at_most_its_quota(
    api_only: Callable[..., Any], redis: ArqRedis
) -> None:
    quota = 3 * len(IMAGE) + len(IMAGE) // 2
    api, settings = await api_only(upload_max_bytes_per_key=quota)
    first = [await accepted(api, IMAGE) for _ in range(3)]
    assert await held_bytes(redis) == 3 * len(IMAGE)

    refused = await upload(api, IMAGE)
    assert refused.status == 429, await refused.text()
    retry_after = int(refused.headers["Retry-After"])
    # when the first upload expires at the latest: no earlier than now, no later than its life
    assert 1 <= retry_after <= upload_life(settings)
    assert upload_life(settings) - retry_after < 60
    assert "UPLOAD_MAX_BYTES_PER_KEY" in (await refused.json())["message"]

    never = await upload(api, os.urandom(quota + 1))
    assert never.status == 422, await never.text()
    assert "more than the" in (await never.json())["message"]
    assert await held_bytes(redis) == 3 * len(IMAGE)  # neither refusal charged anything
    assert len(await redis.keys(UPLOAD_KEY_PREFIX + "*")) == 3

    async with worker_running(settings):
        for job_id in first:
            assert (await wait_job(api, job_id))["status"] == "complete"
        assert await held_bytes(redis) == 0
        job_id = await accepted(api, IMAGE)  # room again
        assert (await wait_job(api, job_id))["status"] == "complete"
    assert await held_bytes(redis) == 0


async def test_an_uploads_life_is_bounded_and_covers_its_delay(
    api_only: Callable[..., Any], redis: ArqRedis
) -> None:
    api, settings = await api_only(upload_ttl=600, job_timeout=60)
    life_ms = upload_life(settings) * 1000
    assert life_ms == 600_000  # UPLOAD_TTL: more than JOB_TIMEOUT + RETRY_MAX_DELAY here

    now = await accepted(api, IMAGE)
    ttl = await redis.pttl(UPLOAD_KEY_PREFIX + now)
    assert life_ms - 10_000 < ttl <= life_ms
    for key in (HELD, HELD + ":sizes", HELD + ":total"):  # the charge expires with it
        assert 0 < await redis.pttl(key) <= life_ms + 1000

    later = await accepted(api, IMAGE, options={"delay_seconds": 120})
    ttl = await redis.pttl(UPLOAD_KEY_PREFIX + later)
    assert 120_000 + life_ms - 10_000 < ttl <= 120_000 + life_ms
    assert await redis.pttl(HELD) <= 120_000 + life_ms + 1000


@pytest.mark.slow
async def test_an_upload_no_worker_takes_expires_with_its_charge(
    api_only: Callable[..., Any], redis: ArqRedis
) -> None:
    """A worker that crashed, or none at all: the quota frees itself when the upload expires."""
    api, settings = await api_only(upload_ttl=1, job_timeout=1, upload_max_bytes_per_key=len(IMAGE))
    assert upload_life(settings) == 1.5  # at least JOB_TIMEOUT + RETRY_MAX_DELAY
    job_id = await accepted(api, IMAGE)
    assert (await upload(api, IMAGE)).status == 429

    async def expired() -> bool:
        keys: int = await redis.exists(UPLOAD_KEY_PREFIX + job_id, HELD, HELD + ":total")
        return keys == 0

    await wait_for(expired, timeout=10, what="the upload and its charge to expire")
    await accepted(api, IMAGE)
    assert await held_bytes(redis) == len(IMAGE)


async def test_uploads_of_a_megabyte_keep_redis_within_the_default_quota(
    api_only: Callable[..., Any], redis: ArqRedis
) -> None:
    """The attack of the report: 1 MB uploads as fast as they are taken, no worker. With the
    default UPLOAD_MAX_BYTES_PER_KEY the bytes kept stop at the quota; the rest are 429s."""
    api, settings = await api_only()
    quota = settings.upload_max_bytes_per_key
    assert quota == 50 * 1024 * 1024
    size = 1_000_000
    statuses = [(await upload(api, os.urandom(size))).status for _ in range(60)]
    fit = quota // size
    assert statuses == [202] * fit + [429] * (60 - fit)
    kept = 0
    for key in await redis.keys(UPLOAD_KEY_PREFIX + "*"):
        kept += await cast(Awaitable[int], redis.hstrlen(key, "data"))
    assert kept == fit * size == await held_bytes(redis)
    assert kept <= quota


async def test_an_upload_kept_by_an_earlier_version_is_still_read(
    api_only: Callable[..., Any], redis: ArqRedis
) -> None:
    """Bytes alone under the upload's key (before this version): the job reads, then drops it."""
    api, settings = await api_only()
    job_id = await accepted(api, IMAGE)
    await redis.delete(UPLOAD_KEY_PREFIX + job_id, HELD, HELD + ":sizes", HELD + ":total")
    await redis.set(UPLOAD_KEY_PREFIX + job_id, IMAGE, ex=3600)
    async with worker_running(settings):
        status = await wait_job(api, job_id)
    assert status["status"] == "complete", status
    assert await redis.exists(UPLOAD_KEY_PREFIX + job_id) == 0


async def test_an_upload_refused_for_its_options_keeps_nothing(
    api_only: Callable[..., Any], redis: ArqRedis
) -> None:
    api, _ = await api_only()
    response = await upload(api, IMAGE, options={"delay_seconds": -1})
    assert response.status == 422
    assert await redis.keys(UPLOAD_KEY_PREFIX + "*") == []
    assert await redis.exists(HELD, HELD + ":total") == 0
