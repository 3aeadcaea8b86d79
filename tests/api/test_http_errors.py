"""Requests aiohttp's HTTP parser refuses, before any handler or middleware runs, are JSON
errors like all the others (app/httperrors.py): 414 for an over-long request line, 431 for an
over-long header or too many, 400 for the rest; one warning line each; counted in /metrics.

aiohttp's client will not send such requests: these tests write raw bytes to a socket."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from app.httperrors import MAX_FIELD_SIZE, MAX_LINE_SIZE, JsonErrorAppRunner
from asyncjobs.settings import Settings
from tests.conftest import API_KEY, TEST_REDIS_URL
from tests.helpers import free_port, served, wait_for

REPO = Path(__file__).resolve().parents[2]
ANSWER_S = 10  # deadline for one answer
START_S = 60  # deadline for `python -m app web` to answer
LONG_URL = b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: test\r\n\r\n"
LONG_HEADER = b"GET /health HTTP/1.1\r\nHost: test\r\nX-Big: " + b"b" * 10_000 + b"\r\n\r\n"
MANY_HEADERS = (
    b"GET /health HTTP/1.1\r\nHost: test\r\n"
    + b"".join(b"X-H%d: 1\r\n" % i for i in range(200))
    + b"\r\n"
)
MALFORMED = {
    "garbage request line": b"GARBAGE\r\n\r\n",
    "unknown HTTP version": b"GET / HTTP/9.x\r\nHost: test\r\n\r\n",
    "bad Content-Length": b"POST /jobs/email HTTP/1.1\r\nHost: test\r\nContent-Length: abc\r\n\r\n",
    "Content-Length and Transfer-Encoding": (
        b"POST /jobs/email HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nabc"
    ),
    "bad Transfer-Encoding": (
        b"POST /jobs/email HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: gzip, chunked, x\r\n\r\n"
    ),
    "space in a header name": b"GET / HTTP/1.1\r\nHost: test\r\nBad Name: 1\r\n\r\n",
}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def exchange(port: int, request: bytes, *, then_closed: bool = False) -> Answer:
    """Send raw bytes, read the answer; `then_closed`: assert the server closes the connection
    after it, as it must after a request it could not parse."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWER_S)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), ANSWER_S)
        if then_closed:
            assert await asyncio.wait_for(reader.read(), ANSWER_S) == b"", "not closed"
    finally:
        writer.close()
    return Answer(int(lines[0].split()[1]), headers, body)


def assert_json_error(answer: Answer, status: int, error: str) -> dict[str, Any]:
    assert answer.status == status, answer
    assert answer.headers["content-type"].startswith("application/json"), answer
    body = answer.json()
    assert set(body) == {"error", "message", "details"}, body
    assert body["error"] == error, body
    assert isinstance(body["message"], str) and body["message"], body
    assert body["details"] == [], body
    return dict(body)


@pytest.fixture
async def port(make_settings: Callable[..., Settings]) -> AsyncIterator[int]:
    """The app served as production serves it (app_runner), on a loopback port."""
    async with served(make_settings()) as served_port:
        yield served_port


async def test_an_over_long_url_is_a_414_in_json_and_one_warning_line(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="app.httperrors"):
        answer = await exchange(port, LONG_URL, then_closed=True)
    body = assert_json_error(answer, 414, "uri_too_long")
    assert str(MAX_LINE_SIZE) in body["message"], body
    records = [r for r in caplog.records if r.name == "app.httperrors"]
    assert len(records) == 1, records
    (record,) = records
    assert record.levelno == logging.WARNING
    assert record.exc_info is None  # no traceback
    line = record.getMessage()
    assert "\n" not in line and "414" in line and "127.0.0.1" in line, line


async def test_an_over_long_header_is_a_431_in_json(port: int) -> None:
    body = assert_json_error(
        await exchange(port, LONG_HEADER), 431, "request_header_fields_too_large"
    )
    assert str(MAX_FIELD_SIZE) in body["message"], body


async def test_too_many_headers_are_a_431_in_json(port: int) -> None:
    body = assert_json_error(
        await exchange(port, MANY_HEADERS), 431, "request_header_fields_too_large"
    )
    assert "128" in body["message"], body  # aiohttp's max_headers


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_malformed_request_is_a_400_in_json(port: int, request_bytes: bytes) -> None:
    body = assert_json_error(await exchange(port, request_bytes), 400, "bad_request")
    assert body["message"].startswith("malformed HTTP request: "), body
    assert "\n" not in body["message"], body


async def test_the_garbage_request_line_is_named_in_the_400(port: int) -> None:
    body = assert_json_error(await exchange(port, b"GARBAGE\r\n\r\n"), 400, "bad_request")
    assert "GARBAGE" in body["message"] and "^" not in body["message"], body


async def test_requests_within_the_limits_are_served_as_before(port: int) -> None:
    """A URL and a header just under the limits reach the app (JSON 404, and /health)."""
    url = b"/" + b"a" * (MAX_LINE_SIZE - 100)
    answer = await exchange(port, b"GET " + url + b" HTTP/1.1\r\nHost: test\r\n\r\n")
    assert_json_error(answer, 401, "unauthorized")  # routed: the API key middleware ran
    header = b"X-Big: " + b"b" * (MAX_FIELD_SIZE - 100)
    answer = await exchange(port, b"GET /health HTTP/1.1\r\nHost: test\r\n" + header + b"\r\n\r\n")
    assert answer.status in (200, 503), answer  # /health answers, Redis or not
    assert "status" in answer.json() or "error" in answer.json(), answer


async def test_refused_requests_are_counted_in_metrics(port: int) -> None:
    assert_json_error(await exchange(port, LONG_URL), 414, "uri_too_long")
    assert_json_error(await exchange(port, LONG_URL), 414, "uri_too_long")
    assert_json_error(await exchange(port, b"GARBAGE\r\n\r\n"), 400, "bad_request")
    answer = await exchange(
        port,
        f"GET /metrics HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {API_KEY}\r\n\r\n".encode(),
    )
    assert answer.status == 200, answer
    text = answer.body.decode()
    assert (
        'asyncjobs_http_requests_total{method="unparsed",route="unparsed",status="414"} 2.0' in text
    ), text
    assert (
        'asyncjobs_http_requests_total{method="unparsed",route="unparsed",status="400"} 1.0' in text
    ), text


@pytest.mark.parametrize(
    ("raised", "status", "error"),
    [(RuntimeError("boom"), 500, "internal_error"), (TimeoutError(), 504, "gateway_timeout")],
)
async def test_an_exception_past_every_middleware_is_json_too(
    raised: Exception, status: int, error: str
) -> None:
    """The app's json_errors middleware catches everything; were something to escape it, or
    another middleware outside it, aiohttp's own 500 (or 504) is JSON as well."""

    async def fails(request: web.Request) -> web.Response:
        raise raised

    app = web.Application()
    app.router.add_get("/fails", fails)
    runner = JsonErrorAppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        request = b"GET /fails HTTP/1.1\r\nHost: test\r\n\r\n"
        answer = await exchange(int(runner.addresses[0][1]), request, then_closed=True)
    finally:
        await runner.cleanup()
    body = assert_json_error(answer, status, error)
    assert "boom" not in body["message"] and "Traceback" not in body["message"], body


def test_the_overridden_aiohttp_method_still_has_the_signature_it_was_written_for() -> None:
    """app/httperrors.py overrides RequestHandler.handle_error (aiohttp 3.14.5): if aiohttp
    changes its parameters, the override must be revisited."""
    parameters = list(inspect.signature(RequestHandler.handle_error).parameters)
    assert parameters == ["self", "request", "status", "exc", "message"]


# --- the production entry point: `python -m app web` -------------------------------------------


async def test_python_m_app_web_answers_parser_errors_in_json_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    web_port = free_port()
    prefixes = ("SMTP_", "MAIL_", "REDIS_", "API_", "SCRAPE_", "WEB_", "LOG_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env |= {
        "REDIS_URL": TEST_REDIS_URL,
        "WEB_HOST": "127.0.0.1",
        "WEB_PORT": str(web_port),
        "API_KEYS": API_KEY,
        "LOG_FORMAT": "json",
        "PYTHONPATH": str(REPO),
    }
    log_path = tmp_path / "web.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "app", "web", cwd=tmp_path, env=env,
            stdout=log_file, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
    try:

        async def answers() -> bool:
            assert process.returncode is None, log_path.read_text()
            try:
                answer = await exchange(web_port, b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
            except OSError:
                return False
            return answer.status in (200, 503)

        await wait_for(answers, timeout=START_S, interval=0.1, what="python -m app web")

        body = assert_json_error(await exchange(web_port, LONG_URL), 414, "uri_too_long")
        assert str(MAX_LINE_SIZE) in body["message"], body
        assert_json_error(
            await exchange(web_port, LONG_HEADER), 431, "request_header_fields_too_large"
        )

        async def logged() -> list[dict[str, Any]]:
            entries = []
            for line in log_path.read_text().splitlines():
                if line.startswith("{"):
                    entry = json.loads(line)
                    if entry.get("logger") == "app.httperrors":
                        entries.append(entry)
            return entries if len(entries) >= 2 else []

        entries = await wait_for(logged, timeout=ANSWER_S, what="the warning lines")
        assert [e["level"] for e in entries] == ["warning", "warning"], entries
        assert [e["status"] for e in entries] == [414, 431], entries
        assert all("exception" not in e for e in entries), entries  # no traceback

        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), ANSWER_S)
        assert code == 0, log_path.read_text()
        output = log_path.read_text()
        assert "Traceback" not in output, output
        assert f"Running on http://127.0.0.1:{web_port}" in output, output
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
