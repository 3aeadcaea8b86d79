"""Real servers on loopback for tests: an SMTP recorder and an HTML site with awkward pages."""

from __future__ import annotations

import asyncio
import email
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage

from aiohttp import web
from aiosmtpd.smtp import SMTP, Envelope, Session

PAGE_HTML = """<!doctype html>
<html><head><title>Test page {n}</title>
<meta name="description" content="A page for tests">
<style>body {{ color: red }}</style><script>var hidden = "not text";</script></head>
<body><h1>Headline {n}</h1><p class="lead">Lead paragraph</p>
<a href="/a">A</a> <a href="/b">B</a> <a href="https://example.org/">C</a>
</body></html>"""


@dataclass
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage


@dataclass
class RecordingSmtpHandler:
    """Keeps every message; `reject_with` makes DATA answer that SMTP reply instead."""

    messages: list[ReceivedMail] = field(default_factory=list)
    reject_with: str | None = None
    data_delay: float = 0.0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.reject_with:
            return self.reject_with
        parsed = email.message_from_bytes(envelope.original_content or b"", policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(
            ReceivedMail(envelope.mail_from or "", list(envelope.rcpt_tos), parsed)
        )
        return "250 OK"

    def message_ids(self) -> list[str]:
        return [str(m.message["Message-ID"]) for m in self.messages]


@dataclass
class SiteStats:
    hits: dict[str, int] = field(default_factory=dict)


def make_site(stats: SiteStats) -> web.Application:
    """Pages: /page/{n}, /slow?ms=, /huge, /loop, /error, /json, /redirect, /missing."""

    @web.middleware
    async def count(request: web.Request, handler):  # type: ignore[no-untyped-def]
        stats.hits[request.path] = stats.hits.get(request.path, 0) + 1
        return await handler(request)

    async def page(request: web.Request) -> web.Response:
        return web.Response(
            text=PAGE_HTML.format(n=request.match_info["n"]), content_type="text/html"
        )

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(int(request.query.get("ms", "200")) / 1000)
        return web.Response(text=PAGE_HTML.format(n="slow"), content_type="text/html")

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/html"})
        await response.prepare(request)
        chunk = b"<p>" + b"x" * 65_536 + b"</p>"
        for _ in range(200):  # ~13 MB, streamed without Content-Length
            await response.write(chunk)
        await response.write_eof()
        return response

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def error(request: web.Request) -> web.Response:
        raise web.HTTPInternalServerError(text="boom")

    async def as_json(request: web.Request) -> web.Response:
        return web.json_response({"not": "html"})

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/page/redirected")

    app = web.Application(middlewares=[count])
    app.router.add_get("/page/{n}", page)
    app.router.add_get("/slow", slow)
    app.router.add_get("/huge", huge)
    app.router.add_get("/loop", loop)
    app.router.add_get("/error", error)
    app.router.add_get("/json", as_json)
    app.router.add_get("/redirect", redirect)
    return app
