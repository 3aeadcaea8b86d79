"""The whole spine at once: HTTP -> Redis -> one worker process running jobs concurrently."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from arq.connections import ArqRedis
from arq.worker import Worker

from jobs.scrape.documents import document_id, load_document
from tests.helpers import ApiClient, wait_for
from tests.servers import RecordingSmtpHandler, SiteStats


async def statuses(api: ApiClient, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    bodies = await asyncio.gather(*(api.get(f"/jobs/{job_id}") for job_id in job_ids))
    return {job_id: await r.json() for job_id, r in zip(job_ids, bodies, strict=True)}


async def wait_all_finished(
    api: ApiClient, job_ids: list[str], timeout: float = 30
) -> dict[str, Any]:
    async def all_finished() -> dict[str, dict[str, Any]] | None:
        current = await statuses(api, job_ids)
        done = all(s["status"] in {"complete", "failed"} for s in current.values())
        return current if done else None

    return await wait_for(all_finished, timeout=timeout, interval=0.1, what="all jobs to finish")


async def test_50_emails_and_50_scrapes_all_complete_exactly_once(
    api: ApiClient,
    worker: Worker,
    redis: ArqRedis,
    smtp: tuple[RecordingSmtpHandler, int],
    site: tuple[str, SiteStats],
) -> None:
    base, stats = site
    email_posts = [
        api.post(
            "/jobs/email", json={"to": f"user{i}@example.com", "subject": f"n{i}", "text": "t"}
        )
        for i in range(50)
    ]
    scrape_posts = [api.post("/jobs/scrape", json={"url": f"{base}/page/{i}"}) for i in range(50)]
    responses = await asyncio.gather(*email_posts, *scrape_posts)
    assert all(r.status == 202 for r in responses)
    accepted = [await r.json() for r in responses]
    final = await wait_all_finished(api, [a["job_id"] for a in accepted])

    assert [s["status"] for s in final.values()] == ["complete"] * 100
    handler, _ = smtp
    sent_ids = sorted(a["message_id"] for a in accepted[:50])
    assert sorted(handler.message_ids()) == sent_ids  # each message exactly once
    assert sorted(m.rcpt_tos[0] for m in handler.messages) == sorted(
        f"user{i}@example.com" for i in range(50)
    )
    for i in range(50):
        doc = await load_document(redis, document_id(f"{base}/page/{i}"))
        assert doc is not None and doc.title == f"Test page {i}"
        assert stats.hits[f"/page/{i}"] == 1


async def test_one_worker_runs_slow_scrapes_concurrently(
    api: ApiClient, worker: Worker, site: tuple[str, SiteStats]
) -> None:
    """20 pages that each take 200 ms finish in far less than 20 x 200 ms = 4 s."""
    base, _ = site
    response = await api.post(
        "/jobs/scrape", json={"urls": [f"{base}/slow?ms=200&n={i}" for i in range(20)]}
    )
    job_ids = [j["job_id"] for j in (await response.json())["jobs"]]
    started = time.monotonic()
    final = await wait_all_finished(api, job_ids)
    elapsed = time.monotonic() - started
    assert all(s["status"] == "complete" for s in final.values())
    assert elapsed < 1.5, f"20 x 200 ms pages took {elapsed:.2f}s in one worker"
    # measured in the jobs themselves too: their run windows overlap
    windows = sorted((s["start_time"], s["finish_time"]) for s in final.values())
    assert windows[-1][0] < windows[0][1], "the last job started only after the first finished"


async def test_a_batch_reports_the_progress_of_its_scrapes(
    api: ApiClient, worker: Worker, site: tuple[str, SiteStats]
) -> None:
    base, _ = site
    urls = [f"{base}/page/1", f"{base}/missing", f"{base}/page/2"]  # /missing answers 404
    accepted = await (await api.post("/jobs/scrape", json={"urls": urls})).json()
    assert accepted["batch_url"] == f"/batches/{accepted['batch_id']}"

    async def finished() -> dict[str, Any] | None:
        batch: dict[str, Any] = await (await api.get(accepted["batch_url"])).json()
        return batch if batch["finished"] == batch["total"] else None

    batch = await wait_for(finished, timeout=30, interval=0.1, what="the batch")
    assert batch["by_status"] == {"complete": 2, "failed": 1}
    assert [j["status"] for j in batch["jobs"]] == ["complete", "failed", "complete"]
    assert [j["url"] for j in batch["jobs"]] == urls
