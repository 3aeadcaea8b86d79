"""Requests aiohttp's HTTP parser refuses, answered as JSON like every other error.

An over-long request line or header, too many headers, a malformed request line, a bad
Content-Length or Transfer-Encoding: aiohttp finds these before any handler or middleware runs,
so `json_errors` never sees them, and aiohttp answered a text/plain 400 ("Got more than 8190
bytes when reading..."). Here they are `{error, message, details}` with the status that says
what was wrong (414, 431 or 400), one warning line each, and counted in /metrics
(`asyncjobs_http_requests_total{route="unparsed"}`).

aiohttp (written against 3.14.5) has no public hook for this: `RequestHandler.handle_error`
builds that response, `web.Server.__call__` always makes a plain RequestHandler, and
`web.run_app` always makes a plain AppRunner. So this module overrides `handle_error` (its
signature is pinned by a test), `web.Server.__call__` (it reads Server's `_loop` and `_kwargs`)
and `AppRunner._make_server`, and app/web.py serves through `JsonErrorAppRunner` instead of
`web.run_app`. tests/api/test_http_errors.py fails if aiohttp stops routing parser errors through
`handle_error` or changes what `LineTooLong` carries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

from app.errors import error_response
from app.metrics import count_unparsed

log = logging.getLogger(__name__)

# A LineTooLong carries the limit it hit and nothing else: with two different limits, the limit
# tells an over-long request line (414) from an over-long header (431). 8190 is aiohttp's
# default for both; a header may be 2 bytes longer (8 KiB, nginx's default buffer).
MAX_LINE_SIZE = 8190  # the request line: method, URL and version
MAX_FIELD_SIZE = 8192  # one header, name and value
TOO_MANY_HEADERS = "Too many headers received"  # aiohttp's BadHttpMessage text (both parsers)
DETAIL_CHARS = 200  # of aiohttp's own description, in the log line and in a 400's message

OnParseError = Callable[[int], None]


def describe(exc: HttpProcessingError, handler: RequestHandler) -> tuple[int, str]:
    """The status and message for what the parser refused."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else "the limit"
        if handler.max_line_size != handler.max_field_size:
            if limit == handler.max_line_size:
                return 414, f"the request line (method, URL, version) is over {limit} bytes"
            if limit == handler.max_field_size:
                return 431, f"a header (name and value) is over {limit} bytes"
        return 400, f"a line of the request is over {limit} bytes"
    if exc.message == TOO_MANY_HEADERS:
        return 431, f"more than {handler.max_headers} headers"
    return 400, f"malformed HTTP request: {one_line(exc.message)}"


def one_line(text: str) -> str:
    """aiohttp's multi-line parser messages ("...:\\n\\n  b'GARBAGE'\\n     ^") on one line,
    without the caret that pointed into the quoted bytes; cut at DETAIL_CHARS."""
    parts = [line.strip() for line in text.splitlines()]
    flat = " ".join(part for part in parts if part.strip("^~ "))
    return flat if len(flat) <= DETAIL_CHARS else flat[: DETAIL_CHARS - 3] + "..."


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, its error answers in JSON."""

    __slots__ = ("_on_parse_error",)

    def __init__(
        self, manager: web.Server, *, on_parse_error: OnParseError | None, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._on_parse_error = on_parse_error

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):  # from the parser: no handler has run
            if request.writer.output_size > 0:  # as aiohttp does: too late for an answer
                raise ConnectionError("a response was already sent; the request is unparsable")
            status, text = describe(exc, self)
            # one line, no traceback (aiohttp logs one at ERROR); the bytes quoted are repr()s
            log.warning(
                "refused an unparsable HTTP request from %s with %d: %s (aiohttp: %s)",
                request.remote, status, text, one_line(exc.message),
                extra={"status": status, "client": request.remote},
            )  # fmt: skip
            if self._on_parse_error is not None:
                self._on_parse_error(status)
            response = error_response(status, text)
        else:  # an exception past every middleware (500) or a handler's timeout (504)
            super().handle_error(request, status, exc, message)  # aiohttp logs it, traceback
            text = "internal error" if status == 500 else HTTPStatus(status).phrase.lower()
            response = error_response(status, text)
        response.force_close()  # as aiohttp does: the connection's state is unknown
        return response


class JsonErrorServer(web.Server):
    """web.Server whose connections are JsonErrorRequestHandlers."""

    def __init__(self, *args: Any, on_parse_error: OnParseError | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.on_parse_error = on_parse_error

    def __call__(self) -> RequestHandler:
        # aiohttp's own __call__ is `RequestHandler(self, loop=self._loop, **self._kwargs)`
        return JsonErrorRequestHandler(
            self, loop=self._loop, on_parse_error=self.on_parse_error, **self._kwargs
        )


class JsonErrorAppRunner(web.AppRunner):
    """web.AppRunner serving through JsonErrorServer, with MAX_LINE_SIZE and MAX_FIELD_SIZE
    unless given; parser errors counted in the app's HTTP metrics."""

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("max_line_size", MAX_LINE_SIZE)
        kwargs.setdefault("max_field_size", MAX_FIELD_SIZE)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # starts the app; the server aiohttp would use
        return JsonErrorServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            on_parse_error=partial(count_unparsed, self.app),
            **plain._kwargs,
        )
