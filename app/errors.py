"""Every error leaves the API as JSON `{error, message, details}`; never a stack trace."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from pydantic import ValidationError
from redis.exceptions import RedisError

from app.schemas import ErrorBody, ErrorDetail
from asyncjobs.redis import NotReplicatedError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

KEPT_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")

ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    431: "request_header_fields_too_large",
    500: "internal_error",
    503: "service_unavailable",
    504: "gateway_timeout",
}


def error_response(
    status: int, message: str, details: list[ErrorDetail] | None = None, error: str | None = None
) -> web.Response:
    body = ErrorBody(
        error=error or ERROR_CODES.get(status, "error"), message=message, details=details or []
    )
    return web.Response(text=body.model_dump_json(), status=status, content_type="application/json")


def validation_details(exc: ValidationError) -> list[ErrorDetail]:
    details = []
    for err in exc.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in err["loc"]) or "body"
        message = err["msg"].removeprefix("Value error, ")
        details.append(ErrorDetail(field=field, message=message))
    return details


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ValidationError as exc:
        return error_response(422, "request is invalid", validation_details(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, exc.reason if exc.text is None else _plain(exc))
        for name in KEPT_HEADERS:  # what tells the client how to do better
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except NotReplicatedError as exc:  # on the primary, not yet on enough replicas
        log.warning("write not replicated on %s %s: %s", request.method, request.path, exc)
        return error_response(
            503,
            f"not confirmed by the replicas in time: {exc}; retry with the same "
            "Idempotency-Key to be sure it is enqueued once",
        )
    except (RedisError, ConnectionError) as exc:
        log.warning("broker unavailable on %s %s: %s", request.method, request.path, exc)
        return error_response(503, "the job broker (Redis) is unavailable; try again later")
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal error", error="internal_error")


def _plain(exc: web.HTTPException) -> str:
    """aiohttp's default bodies look like '404: Not Found'; keep only the human part."""
    text = exc.text or exc.reason
    prefix = f"{exc.status}: "
    return text.removeprefix(prefix)
