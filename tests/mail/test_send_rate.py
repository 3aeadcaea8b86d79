"""SMTP_MAX_PER_SECOND: messages over the rate wait for their turn (in the worker when it is
near, back in the queue when it is far), and none fails."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from arq.connections import ArqRedis

import jobs.mail.sendrate
from app.web import create_app
from asyncjobs.keys import DEAD_INDEX_KEY
from asyncjobs.settings import Settings
from tests.conftest import start_worker, stop_worker
from tests.faults.conftest import delivery_counts, post_emails, wait_all_finished
from tests.helpers import api_client
from tests.servers import RecordingSmtpHandler


def busiest_second(times: list[float]) -> int:
    """The most messages accepted within any one second."""
    times = sorted(times)
    return max(sum(1 for t in times[i:] if t < start + 1.0) for i, start in enumerate(times))


async def send_at_rate(
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    smtp: tuple[RecordingSmtpHandler, int],
    count: int,
    per_second: float,
) -> list[float]:
    settings = make_settings(smtp_max_per_second=per_second)
    worker, task = await start_worker(settings)
    try:
        async with api_client(create_app(settings)) as api:
            accepted = await post_emails(api, count, "rate")
            views = await wait_all_finished(redis, [a["job_id"] for a in accepted], timeout=60)
    finally:
        await stop_worker(worker, task)
    assert [v.status for v in views] == ["complete"] * count
    assert delivery_counts(smtp[0], accepted) == (count, 0, 0)
    assert await redis.zcard(DEAD_INDEX_KEY) == 0
    return [m.received_at for m in smtp[0].messages]


@pytest.mark.slow
async def test_100_messages_at_20_per_second_take_about_5_seconds_and_none_fails(
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    smtp: tuple[RecordingSmtpHandler, int],
    fault_report: Callable[[str], None],
) -> None:
    times = await send_at_rate(make_settings, redis, smtp, 100, 20)
    took = max(times) - min(times)
    fault_report(f"SMTP_MAX_PER_SECOND=20: 100 messages in {took:.2f} s, busiest second "
                 f"{busiest_second(times)}")  # fmt: skip
    assert took >= 99 / 20 * 0.95  # 99 gaps of 50 ms: the rate holds over the batch
    assert took < 15  # and the messages were not held back for longer than the rate needs
    # Within one second a few more can arrive: a worker that wakes late for its turn sends
    # late, and the turns after it are on time (seen: up to 25). Without the limit: all 100.
    assert busiest_second(times) <= 30


@pytest.mark.slow
async def test_a_far_turn_waits_in_the_queue_not_in_the_worker(
    make_settings: Callable[..., Settings],
    redis: ArqRedis,
    smtp: tuple[RecordingSmtpHandler, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With turns over 0.5 s away put back in the queue, 30 messages at 10/s are still all
    sent, once each, at the rate."""
    monkeypatch.setattr(jobs.mail.sendrate, "MAX_WAIT_S", 0.5)
    times = await send_at_rate(make_settings, redis, smtp, 30, 10)
    assert max(times) - min(times) >= 29 / 10 * 0.95
    assert busiest_second(times) <= 15
