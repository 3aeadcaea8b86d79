"""Completion webhooks: when a job with a `callback_url` ends for good (complete, failed,
aborted), its worker enqueues `deliver_webhook`, which POSTs `{job_id, status, result, error}`
signed with HMAC-SHA256 over a timestamp and the raw body, key WEBHOOK_SECRET (the scheme of
asyncjobs.signing, which HTTP jobs share), through the scraper's SSRF guard, retried with
backoff like any job.

The delivery is recorded on the job (`asyncjobs:callback:<job id>`, shown by GET /jobs/{id}):
url, state (pending, delivered, failed), tries, the last HTTP status or error.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

import aiohttp
from arq.connections import ArqRedis
from pydantic import BaseModel
from redis.asyncio import Redis
from yarl import URL

from asyncjobs import tracing
from asyncjobs.errors import PermanentJobError, TransientJobError
from asyncjobs.keys import CALLBACK_KEY_PREFIX
from asyncjobs.signing import JOB_ID_HEADER, signed_headers
from jobs.context import WorkerContext
from jobs.engine.queue import enqueue_job
from jobs.retry import builtin
from jobs.scrape.fetch import parse_retry_after, translate_errors
from jobs.scrape.guard import check_url
from jobs.values import as_text

MAX_RESULT_CHARS = 64 * 1024  # a result larger than this is sent as a note, not inline
CALLBACK_TTL_S = 7 * 24 * 3600

FinalStatus = Literal["complete", "failed", "aborted"]


class CallbackRecord(BaseModel):
    url: str
    state: Literal["pending", "delivered", "failed"]
    tries: int = 0
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: float | None = None


def webhook_payload(job_id: str, status: FinalStatus, outcome: Any) -> dict[str, Any]:
    """{job_id, status, result or error}; a result that is not JSON is sent as its text."""
    if status != "complete":
        return {"job_id": job_id, "status": status, "error": str(outcome)}
    text = json.dumps(outcome, default=str)
    result = json.loads(text) if len(text) <= MAX_RESULT_CHARS else {"truncated": True}
    return {"job_id": job_id, "status": status, "result": result}


async def enqueue_webhook(
    redis: ArqRedis, url: str, job_id: str, status: FinalStatus, outcome: Any
) -> None:
    """Queue the delivery and record it as pending. The delivery's job id is derived from the
    job's, so a job run twice (its worker died after this) is reported once."""
    await enqueue_job(
        redis,
        "deliver_webhook",
        url=url,
        payload=webhook_payload(job_id, status, outcome),
        _job_id=f"webhook:{job_id}",
    )
    record = CallbackRecord(url=url, state="pending")
    await redis.set(CALLBACK_KEY_PREFIX + job_id, record.model_dump_json(), ex=CALLBACK_TTL_S)


async def read_callback(redis: Redis, job_id: str) -> CallbackRecord | None:
    raw = await redis.get(CALLBACK_KEY_PREFIX + job_id)
    return CallbackRecord.model_validate_json(as_text(raw)) if raw else None


async def _record(redis: Redis, job_id: str, **changes: Any) -> None:
    record = await read_callback(redis, job_id)
    if record is not None:
        updated = record.model_copy(update=changes)
        await redis.set(CALLBACK_KEY_PREFIX + job_id, updated.model_dump_json(), ex=CALLBACK_TTL_S)


async def _mark_failed(ctx: WorkerContext, kwargs: dict[str, Any]) -> None:
    """Dead-letter hook: the receiver never accepted it."""
    job_id = kwargs["payload"].get("job_id")
    if job_id is not None:  # a batch's callback (no job_id in it) keeps no record
        await _record(ctx.redis, job_id, state="failed")


@builtin("deliver_webhook", "webhook", on_dead_letter=_mark_failed, shown=("url",))
async def deliver_webhook(ctx: WorkerContext, *, url: str, payload: dict[str, Any]) -> int:
    """POST the payload once; the receiver's HTTP status. 2xx is delivered; 408, 429, 5xx and
    network errors are tried again; other answers, redirects included, fail for good."""
    settings = ctx.settings
    secret = settings.webhook_secret
    if secret is None:
        raise PermanentJobError("WEBHOOK_SECRET is not set: cannot sign the callback")
    # the job the payload reports on; a batch's callback ({event, batch_id, total, counts}:
    # jobs.engine.dependencies) is named by its own job id, `<batch id>-callback`
    job_id = str(payload.get("job_id") or ctx.job_id)
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        **signed_headers(secret.get_secret_value(), body),  # signed per try: a fresh timestamp
        JOB_ID_HEADER: job_id,
    }
    target = URL(url)
    session = ctx.fetcher.session
    status: int | None = None
    try:
        with (
            tracing.client_span("webhook", target, **{"asyncjobs.job.id": job_id}),
            translate_errors(target, settings),
        ):
            check_url(target, settings.scrape_allowed_cidrs, settings.scrape_allowed_ports)
            async with session.post(
                target,
                data=body,
                headers={**headers, **tracing.outbound_headers()},  # traceparent, if tracing
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=settings.webhook_timeout),
            ) as response:
                status = response.status
                tracing.set_attribute("http.response.status_code", status)
                _check_answer(response)
    except Exception as exc:
        await _record(ctx.redis, job_id, tries=ctx.job_try, last_status=status, last_error=str(exc))
        raise
    await _record(
        ctx.redis,
        job_id,
        state="delivered",
        tries=ctx.job_try,
        last_status=status,
        last_error=None,
        delivered_at=time.time(),
    )
    return status


def _check_answer(response: aiohttp.ClientResponse) -> None:
    status = response.status
    if 200 <= status < 300:
        return
    reason = f"HTTP {status} from {response.url}"
    if status in (408, 429) or status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise TransientJobError(reason, retry_after=retry_after)
    raise PermanentJobError(reason)  # a redirect included: the receiver gave the wrong URL
