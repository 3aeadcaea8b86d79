"""/health, /openapi.json, /favicon.ico and, in development, /dev/mail (the local mail sink's
messages)."""

from __future__ import annotations

from aiohttp import web
from redis.exceptions import RedisError

from app import mailsink
from app.http import json_model, query_int
from app.openapi import openapi_document
from app.schemas import Health, MailList, WorkerHealth
from app.state import REDIS, SETTINGS
from asyncjobs.arqcompat import health_check_key_suffix
from asyncjobs.keys import SMTP_PROBLEM_KEY
from asyncjobs.settings import Settings
from jobs.mail.smtpconfig import parse_problem
from jobs.values import as_text

FAVICON_PATH = "/ui/static/favicon.svg"  # served by the dashboard's static route, no session


async def health(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    redis = request.app[REDIS]
    try:
        async with redis.pipeline(transaction=False) as pipe:
            pipe.get(settings.queue_name + health_check_key_suffix)
            pipe.hgetall(SMTP_PROBLEM_KEY)  # a worker's SMTP configuration failure, if any
            heartbeat, smtp_problem = await pipe.execute()
    except (RedisError, OSError):
        body = Health(
            status="unavailable",
            redis="unreachable",
            worker=WorkerHealth(alive=False),
            version=settings.version,
        )
        return json_model(body, status=503)
    beat = as_text(heartbeat) if heartbeat is not None else None
    worker = WorkerHealth(alive=beat is not None, heartbeat=beat)
    smtp = parse_problem(smtp_problem)
    body = Health(
        status="ok" if worker.alive and smtp is None else "degraded",
        redis="ok",
        worker=worker,
        version=settings.version,
        smtp=smtp,
    )
    return json_model(body)


async def list_mail(request: web.Request) -> web.Response:
    folder = request.app[SETTINGS].mail_sink_dir
    assert folder is not None
    limit = query_int(request, "limit", default=50, lo=1, hi=500)
    messages = await mailsink.list_messages(folder, limit)
    return json_model(MailList(messages=messages))


async def show_mail(request: web.Request) -> web.Response:
    folder = request.app[SETTINGS].mail_sink_dir
    assert folder is not None
    raw = await mailsink.read_message(folder, request.match_info["name"])
    if raw is None:
        raise web.HTTPNotFound(text="no such message")
    return web.Response(body=raw, content_type="message/rfc822")


async def favicon(request: web.Request) -> web.Response:
    """Browsers ask for /favicon.ico on their own: the dashboard's icon, without a key (it was
    a 401 logged on every page)."""
    raise web.HTTPMovedPermanently(FAVICON_PATH)


def add_system_routes(app: web.Application, settings: Settings) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/openapi.json", openapi_document)
    if settings.mail_sink_dir is not None:
        app.router.add_get("/dev/mail", list_mail)
        app.router.add_get(f"/dev/mail/{{name:{mailsink.MESSAGE_NAME_PATTERN}}}", show_mail)
