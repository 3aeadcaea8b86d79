"""HTTP handlers: validate, enqueue, report. Each one is small; the work happens in the worker."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from arq.connections import ArqRedis
from arq.constants import health_check_key_suffix
from pydantic import BaseModel
from redis.exceptions import RedisError

from app import mailsink
from app.jobstatus import read_job
from app.schemas import (
    EmailAccepted,
    EmailSpec,
    Health,
    ScrapeAccepted,
    ScrapeBatchAccepted,
    ScrapeRequest,
    WorkerHealth,
)
from app.settings import Settings
from jobs.email import new_message_id

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", ArqRedis)

JOB_ID_PATTERN = r"[A-Za-z0-9_.:-]{1,128}"


def json_model(model: BaseModel, status: int = 200) -> web.Response:
    return web.json_response(model.model_dump(mode="json"), status=status)


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; 400 for empty or malformed JSON, 413 (by aiohttp) if too big."""
    raw = await request.read()
    if not raw.strip():
        raise web.HTTPBadRequest(text="request body is empty: send a JSON object")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise web.HTTPBadRequest(text=f"request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise web.HTTPUnprocessableEntity(text="request body must be a JSON object")
    return data


def status_url(request: web.Request, job_id: str) -> str:
    return str(request.app.router["job_status"].url_for(job_id=job_id))


async def enqueue_email(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    context = {
        "max_recipients": settings.mail_max_recipients,
        "allowed_sender_domains": settings.mail_allowed_sender_domains,
    }
    spec = EmailSpec.model_validate(await read_json_object(request), context=context)
    message_id = new_message_id(spec.from_ or settings.mail_from)
    job = await request.app[REDIS].enqueue_job(
        "send_email", email=spec.model_dump(mode="json", by_alias=True), message_id=message_id
    )
    assert job is not None  # a fresh random id never collides
    accepted = EmailAccepted(
        job_id=job.job_id, status_url=status_url(request, job.job_id), message_id=message_id
    )
    return json_model(accepted, status=202)


async def enqueue_scrape(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    context = {"max_urls": settings.max_urls_per_request, "max_selectors": settings.max_selectors}
    scrape = ScrapeRequest.model_validate(await read_json_object(request), context=context)
    redis = request.app[REDIS]
    accepted = []
    for target in scrape.targets():
        job = await redis.enqueue_job("scrape", target=target.model_dump(mode="json"))
        assert job is not None
        accepted.append(
            ScrapeAccepted(
                job_id=job.job_id, status_url=status_url(request, job.job_id), url=str(target.url)
            )
        )
    if scrape.url is not None:
        return json_model(accepted[0], status=202)
    return json_model(ScrapeBatchAccepted(jobs=accepted), status=202)


async def job_status(request: web.Request) -> web.Response:
    view = await read_job(
        request.app[REDIS], request.match_info["job_id"], request.app[SETTINGS].queue_name
    )
    return json_model(view, status=404 if view.status == "not_found" else 200)


async def health(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    redis = request.app[REDIS]
    try:
        heartbeat = await redis.get(settings.queue_name + health_check_key_suffix)
    except (RedisError, OSError):
        body = Health(
            status="unavailable",
            redis="unreachable",
            worker=WorkerHealth(alive=False),
            version=settings.version,
        )
        return json_model(body, status=503)
    worker = WorkerHealth(alive=heartbeat is not None, heartbeat=_text(heartbeat))
    body = Health(
        status="ok" if worker.alive else "degraded",
        redis="ok",
        worker=worker,
        version=settings.version,
    )
    return json_model(body)


async def list_mail(request: web.Request) -> web.Response:
    folder = request.app[SETTINGS].mail_sink_dir
    assert folder is not None
    limit = _int_query(request, "limit", default=50, lo=1, hi=500)
    messages = await mailsink.list_messages(folder, limit)
    return web.json_response({"messages": [m.model_dump(mode="json") for m in messages]})


async def show_mail(request: web.Request) -> web.Response:
    folder = request.app[SETTINGS].mail_sink_dir
    assert folder is not None
    raw = await mailsink.read_message(folder, request.match_info["name"])
    if raw is None:
        raise web.HTTPNotFound(text="no such message")
    return web.Response(body=raw, content_type="message/rfc822")


def _int_query(request: web.Request, name: str, *, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise web.HTTPBadRequest(text=f"query parameter {name!r} must be an integer {lo}..{hi}")
    return int(raw)


def _text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def add_routes(app: web.Application, settings: Settings) -> None:
    app.router.add_post("/jobs/email", enqueue_email)
    app.router.add_post("/jobs/scrape", enqueue_scrape)
    app.router.add_get(f"/jobs/{{job_id:{JOB_ID_PATTERN}}}", job_status, name="job_status")
    app.router.add_get("/health", health)
    if settings.mail_sink_dir is not None:
        app.router.add_get("/dev/mail", list_mail)
        app.router.add_get(f"/dev/mail/{{name:{mailsink.MESSAGE_NAME_PATTERN}}}", show_mail)
