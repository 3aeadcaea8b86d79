"""`POST /jobs/http`: call a URL in the background, signed, retried, within per-target limits.

The body is the request (jobs.http.spec.HttpCall) plus the usual job options; it is checked
here, with the settings' limits and what the SSRF guard can tell without DNS (scheme, port, an
address literal), so that a request no worker would make is a 422 naming the field, not a dead
letter. A name is resolved, and checked again, by the worker on every try.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError
from yarl import URL

from app.http import enqueue, json_model, status_url
from app.idempotency import idempotent
from app.joboptions import read_job_request
from app.schemas import JobAccepted
from app.state import SETTINGS
from asyncjobs.settings import Settings
from jobs.engine.unique import is_existing
from jobs.http.spec import HttpCall
from jobs.scrape.guard import ForbiddenTargetError, check_url


def checked_call(body: dict[str, object], settings: Settings) -> HttpCall:
    """The request, valid and allowed by the settings and the guard; a 422 otherwise."""
    if settings.http_jobs_signing_secret is None:
        raise web.HTTPUnprocessableEntity(
            text="this server has no HTTP_JOBS_SECRET (or WEBHOOK_SECRET) to sign HTTP jobs with"
        )
    call = HttpCall.model_validate(body, context={"settings": settings})
    try:
        check_url(
            URL(str(call.url)), settings.http_jobs_allowed_cidrs, settings.http_jobs_allowed_ports
        )
    except ForbiddenTargetError as exc:
        error = PydanticCustomError("forbidden_target", "refused by the SSRF guard: {reason}",
                                    {"reason": str(exc)})  # fmt: skip
        details = InitErrorDetails(type=error, loc=("url",), input=str(call.url))
        raise ValidationError.from_exception_data("HttpCall", [details]) from None
    return call


@idempotent
async def enqueue_http(request: web.Request) -> web.Response:
    options, body = await read_job_request(request)
    call = checked_call(body, request.app[SETTINGS])
    job_id = await enqueue(
        request, "http", **call.model_dump(mode="json"), **options.enqueue_kwargs()
    )
    accepted = JobAccepted(
        job_id=job_id, status_url=status_url(request, job_id), existing=is_existing(job_id)
    )
    return json_model(accepted, status=202)


def add_http_job_routes(app: web.Application) -> None:
    app.router.add_post("/jobs/http", enqueue_http)
