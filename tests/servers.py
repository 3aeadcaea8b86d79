"""Real servers on loopback for tests: an SMTP recorder and an HTML site with awkward pages."""

from __future__ import annotations

import asyncio
import email
import ssl
import warnings
from collections import Counter
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from typing import cast

from aiohttp import web
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

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
    received_at: float = 0.0  # the event loop's clock when it was accepted
    raw: bytes = b""  # the message as it came (DATA), for what parsing hides: line lengths


@dataclass
class RecordingSmtpHandler:
    """Keeps every message it accepts.

    - `reject_with`: DATA answers that reply instead; `refuse_rcpt`: RCPT TO answers 550.
    - `data_delay`: seconds each DATA takes; `in_data` counts messages inside that delay.
    - `gate`: while cleared, finished DATA waits before being accepted.
    - A message the server has whole (its final "." line came) is kept even if its client
      goes away before the 250 (during `data_delay` or at the `gate`), as Postfix and Exim
      queue and deliver it: `reply_lost` counts those, whose client could not learn it was
      taken. A client gone before the final "." leaves nothing (aiosmtpd never calls
      handle_DATA for it). `reject_with` rejects either way.
    - `unacknowledged`: accepted messages whose client has sent nothing since on that
      connection (no MAIL, RSET, NOOP or QUIT), those whose reply was lost included. After a
      client is killed, those are the ones that were in their final reply: the only ones it
      may send again without knowing.
    - `defer_rcpt`: RCPT TO answers 451 (try later); `refuse_sender`: MAIL FROM answers 553;
      `rcpt_attempts` counts the RCPT TO each address got, whatever the answer.
    - `close_after`: after that many messages on one connection, the next MAIL FROM answers
      421 and the server closes the connection (Exim's smtp_accept_max_per_connection);
      `hang_up_on_mail`: that many next MAIL FROM close the connection with no answer at all
      (an idle connection dropped, found by the client's next command). `closed` counts both.
    - `password`: with `start_auth_smtp_server`, AUTH must give it (`auth_attempts` counts).
    - `connections`: connections that said EHLO.
    """

    messages: list[ReceivedMail] = field(default_factory=list)
    reject_with: str | None = None
    refuse_rcpt: set[str] = field(default_factory=set)
    defer_rcpt: set[str] = field(default_factory=set)
    refuse_sender: set[str] = field(default_factory=set)
    rcpt_attempts: Counter[str] = field(default_factory=Counter)
    close_after: int | None = None
    hang_up_on_mail: int = 0
    closed: int = 0
    password: str | None = None
    auth_attempts: int = 0
    data_delay: float = 0.0
    in_data: int = 0
    reply_lost: int = 0
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    pipelining: bool = True
    # per connection (the aiosmtpd protocol object): the message accepted last, until the client
    # sends its next command there
    _last_accepted: dict[SMTP, str] = field(default_factory=dict)
    _accepted_on: Counter[SMTP] = field(default_factory=Counter)  # messages per connection

    def __post_init__(self) -> None:
        self.gate.set()

    @property
    def connections(self) -> int:
        return len(self._accepted_on)

    def messages_per_connection(self) -> list[int]:
        """Messages accepted on each connection that carried any, in the order they opened."""
        return [n for n in self._accepted_on.values() if n]

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: object
    ) -> AuthResult:
        """aiosmtpd's authenticator: the login's password must be `password`."""
        self.auth_attempts += 1
        given = data.password.decode() if isinstance(data, LoginPassword) else None
        return AuthResult(success=given is not None and given == self.password, handled=False)

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:  # fmt: skip
        """Say PIPELINING, as Postfix and Exim do (aiosmtpd reads pipelined commands fine but
        does not say so), unless `pipelining` is off: the client's other path."""
        session.host_name = hostname
        self._accepted_on[server] += 0  # counted as a connection from its first EHLO
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    def unacknowledged(self) -> list[str]:
        """Message-IDs accepted on connections whose client has said nothing since."""
        return list(self._last_accepted.values())

    def open_connections_with_unacknowledged(self) -> int:
        return sum(
            1
            for s in self._last_accepted
            if s.transport is not None and not s.transport.is_closing()
        )

    def _acknowledged(self, server: SMTP) -> None:
        self._last_accepted.pop(server, None)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self._acknowledged(server)
        if self.hang_up_on_mail > 0 and server.transport is not None:
            self.hang_up_on_mail -= 1
            self.closed += 1
            # no answer: what a client finds on a dropped connection (uvloop's transports are
            # not asyncio.Transport subclasses, hence the cast rather than an isinstance)
            cast(asyncio.WriteTransport, server.transport).abort()
            return "421 never seen"
        if self.close_after is not None and self._accepted_on[server] >= self.close_after:
            self.closed += 1
            transport = server.transport
            if transport is not None:  # after the reply below has been written
                asyncio.get_running_loop().call_soon(transport.close)
            return "421 4.7.0 Too many messages in this connection, closing"
        if address in self.refuse_sender:
            return "553 5.7.1 Sender address rejected: not owned by user"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._acknowledged(server)
        return "250 OK"

    async def handle_NOOP(
        self, server: SMTP, session: Session, envelope: Envelope, arg: str
    ) -> str:
        self._acknowledged(server)
        return "250 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._acknowledged(server)
        return "221 Bye"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.rcpt_attempts[address] += 1
        if address in self.refuse_rcpt:
            return "550 5.1.1 Mailbox unavailable"
        if address in self.defer_rcpt:
            return "451 4.3.0 Mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.in_data += 1
        try:
            if self.data_delay:
                await asyncio.sleep(self.data_delay)
            await self.gate.wait()
        except asyncio.CancelledError:  # aiosmtpd cancels us when the client disconnects
            self.reply_lost += 1
            if not self.reject_with:  # the whole message is here: a real MTA delivers it
                self._keep(server, envelope)
            raise
        finally:
            self.in_data -= 1
        if self.reject_with:
            return self.reject_with
        if server.transport is None or server.transport.is_closing():
            self.reply_lost += 1  # kept all the same; the 250 below reaches nobody
        self._keep(server, envelope)
        return "250 OK"

    def _keep(self, server: SMTP, envelope: Envelope) -> None:
        parsed = email.message_from_bytes(envelope.original_content or b"", policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        self.messages.append(
            ReceivedMail(
                envelope.mail_from or "",
                list(envelope.rcpt_tos),
                parsed,
                asyncio.get_running_loop().time(),
                envelope.original_content or b"",
            )
        )
        self._last_accepted[server] = str(parsed["Message-ID"])
        self._accepted_on[server] += 1

    def open_connections(self) -> int:
        """Connections that said EHLO and are still open."""
        return sum(
            1 for s in self._accepted_on if s.transport is not None and not s.transport.is_closing()
        )

    def message_ids(self) -> list[str]:
        return [str(m.message["Message-ID"]) for m in self.messages]


async def start_auth_smtp_server(
    handler: RecordingSmtpHandler, tls: ssl.SSLContext | None = None
) -> asyncio.Server:
    """An SMTP server on loopback that requires AUTH with `handler.password` before MAIL (over
    plain text unless `tls`: a test's loopback only), as a submission server does."""

    def protocol() -> SMTP:
        with warnings.catch_warnings():  # aiosmtpd warns about AUTH without TLS
            warnings.simplefilter("ignore", UserWarning)
            return SMTP(
                handler,
                hostname="asyncjobs-test",
                authenticator=handler.authenticate,
                auth_required=True,
                auth_require_tls=False,
                tls_context=tls,
            )

    return await asyncio.get_running_loop().create_server(protocol, host="127.0.0.1", port=0)


# Bytes of every value, CR LF and NUL included: what an attachment must carry unchanged
INVOICE_PDF = b"%PDF-1.4\r\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\n\x00" + bytes(
    range(256)
)


@dataclass
class SiteStats:
    hits: dict[str, int] = field(default_factory=dict)
    # /docs pages: their version (bump to change them), and per path the conditional requests
    # (If-None-Match or If-Modified-Since) and the 304s answered
    docs_version: int = 1
    conditional: dict[str, int] = field(default_factory=dict)
    not_modified: dict[str, int] = field(default_factory=dict)


def make_site(stats: SiteStats) -> web.Application:
    """Pages: /page/{n}, /slow?ms=, /huge, /loop, /error, /json, /redirect, /flaky, /missing,
    /nested?depth= (divs inside divs); a file: /files/invoice.pdf (INVOICE_PDF)."""

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

    async def redirect_to(request: web.Request) -> web.Response:
        """A 302 to the Location given as `to`, as it is (a broken one included)."""
        stats.hits["redirect-to"] = stats.hits.get("redirect-to", 0) + 1
        return web.Response(status=302, headers={"Location": request.query["to"]})

    async def flaky(request: web.Request) -> web.Response:
        """Fails `fail` times per `key` with `status` (and Retry-After if given), then works."""
        key = f"flaky:{request.query['key']}"
        stats.hits[key] = stats.hits.get(key, 0) + 1
        if stats.hits[key] <= int(request.query.get("fail", "1")):
            headers = {}
            if "retry_after" in request.query:
                headers["Retry-After"] = request.query["retry_after"]
            return web.Response(status=int(request.query.get("status", "503")), headers=headers)
        return web.Response(text=PAGE_HTML.format(n="flaky"), content_type="text/html")

    async def invoice(request: web.Request) -> web.Response:
        """A small PDF-like file (an email attachment's URL), not HTML."""
        return web.Response(body=INVOICE_PDF, content_type="application/pdf")

    async def nested(request: web.Request) -> web.Response:
        depth = int(request.query.get("depth", "100"))
        body = "<html><body>" + "<div>" * depth + "deep" + "</div>" * depth + "</body></html>"
        return web.Response(text=body, content_type="text/html")

    app = web.Application(middlewares=[count])
    app.router.add_get("/page/{n}", page)
    app.router.add_get("/nested", nested)
    app.router.add_get("/slow", slow)
    app.router.add_get("/huge", huge)
    app.router.add_get("/loop", loop)
    app.router.add_get("/error", error)
    app.router.add_get("/json", as_json)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/redirect-to", redirect_to)
    app.router.add_get("/flaky", flaky)
    app.router.add_get("/files/invoice.pdf", invoice)
    add_scrape_feature_pages(app, stats)
    return app


DOCS_PAGES = 4  # /docs/0 links to /docs/1..4 and to /docs/5, which is missing (404)
DOCS_LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"

RICH_HTML = """<!doctype html>
<html><head><title>Rich page</title>
<base href="/base/">
<link rel="canonical" href="/rich?canonical=1">
<meta name="description" content="A page with metadata">
<meta property="og:title" content="OG title"><meta property="og:type" content="article">
<meta property="og:image" content="https://cdn.example.org/i.png">
<meta property="og:title" content="a second og:title">
<script type="application/ld+json">{"@type": "Article", "headline": "JSON-LD headline"}</script>
<script type="application/ld+json">[{"@type": "BreadcrumbList"}, {"@type": "Person"}]</script>
<script type="application/ld+json">{"broken": true,}</script>
</head><body><h1>Rich</h1>
<a class="item" href="one">One</a> <a class="item" href="/two#part">Two</a>
<a class="item" href="https://example.org/three">Three</a> <a class="item" href="one">One again</a>
<a href="mailto:someone@example.org">mail</a> <a href="javascript:void(0)">js</a>
<a class="item">no href</a>
<img src="pics/a.png"> <img src="/pics/b.png">
</body></html>"""


def add_scrape_feature_pages(app: web.Application, stats: SiteStats) -> None:
    """/docs/{n} (ETag and Last-Modified: 304 to either validator), /encoded?text=&as=
    (`text` in encoding `as`, served with no charset), /rich (links, canonical, OpenGraph,
    JSON-LD, <base href>), /list?items=&size= (a long list)."""

    async def docs(request: web.Request) -> web.Response:
        n = request.match_info["n"]
        if not n.isdigit() or int(n) > DOCS_PAGES:
            raise web.HTTPNotFound(text="no such page")
        etag = f'"docs-{n}-v{stats.docs_version}"'
        headers = {"ETag": etag, "Last-Modified": DOCS_LAST_MODIFIED}
        if_none_match = request.headers.get("If-None-Match")
        if_modified_since = request.headers.get("If-Modified-Since")
        if if_none_match or if_modified_since:
            stats.conditional[request.path] = stats.conditional.get(request.path, 0) + 1
        fresh = if_none_match == etag if if_none_match else (
            if_modified_since == DOCS_LAST_MODIFIED and stats.docs_version == 1
        )  # fmt: skip
        if fresh:
            stats.not_modified[request.path] = stats.not_modified.get(request.path, 0) + 1
            return web.Response(status=304, headers=headers)
        links = "".join(f'<a href="/docs/{k}">{k}</a>' for k in range(1, DOCS_PAGES + 2))
        body = (
            f"<html><head><title>Doc {n} v{stats.docs_version}</title>"
            f'<meta property="og:title" content="Doc {n}"></head><body>'
            f'<h1 class="title">Doc {n}</h1><a class="next" href="/docs/{int(n) + 1}">next</a>'
            f"{links if n == '0' else ''}<p>version {stats.docs_version}</p></body></html>"
        )
        return web.Response(text=body, content_type="text/html", headers=headers)

    async def encoded(request: web.Request) -> web.Response:
        text = request.query["text"]
        body = f"<html><head><title>{text}</title></head><body><p>{text}</p></body></html>"
        return web.Response(
            body=body.encode(request.query["as"]), headers={"Content-Type": "text/html"}
        )

    async def rich(request: web.Request) -> web.Response:
        return web.Response(text=RICH_HTML, content_type="text/html")

    async def long_list(request: web.Request) -> web.Response:
        """`items` list items of `size` characters each."""
        item = "x" * int(request.query.get("size", "10"))
        items = "".join(f"<li>{item}</li>" for _ in range(int(request.query.get("items", "3"))))
        return web.Response(text=f"<ul>{items}</ul>", content_type="text/html")

    app.router.add_get("/docs/{n}", docs)
    app.router.add_get("/encoded", encoded)
    app.router.add_get("/rich", rich)
    app.router.add_get("/list", long_list)


@dataclass
class CrawlStats:
    """What the crawl site saw: hits per path, request headers, concurrency per Host."""

    version: int = 1  # bump to change the /news page
    hits: dict[str, int] = field(default_factory=dict)
    headers: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    max_in_flight: dict[str, int] = field(default_factory=dict)
    starts: dict[str, list[float]] = field(default_factory=dict)


ROBOTS_TXT = "User-agent: *\nDisallow: /private\n"


def make_crawl_site(
    stats: CrawlStats, slow_ms: int = 200, plain_delays: tuple[float, ...] = ()
) -> web.Application:
    """/robots.txt, /news (ETag, changes when stats.version changes, links to /news/1..5,
    /private/secret and another host), /news/{n} (slow), /private/secret, /plain/{n} (no ETag;
    the k-th /plain request to a host takes `plain_delays[k]` seconds, the later ones none)."""

    @web.middleware
    async def record(request: web.Request, handler):  # type: ignore[no-untyped-def]
        host = request.host.rsplit(":", 1)[0]
        stats.hits[request.path] = stats.hits.get(request.path, 0) + 1
        stats.headers.setdefault(request.path, []).append(dict(request.headers))
        stats.starts.setdefault(host, []).append(asyncio.get_running_loop().time())
        stats.in_flight[host] = stats.in_flight.get(host, 0) + 1
        stats.max_in_flight[host] = max(stats.max_in_flight.get(host, 0), stats.in_flight[host])
        try:
            return await handler(request)
        finally:
            stats.in_flight[host] -= 1

    async def robots(request: web.Request) -> web.Response:
        return web.Response(text=ROBOTS_TXT, content_type="text/plain")

    async def news(request: web.Request) -> web.Response:
        etag = f'"v{stats.version}"'
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        links = "".join(f'<a href="/news/{n}#top">{n}</a>' for n in range(1, 6))
        body = (
            f"<html><head><title>News v{stats.version}</title></head><body>{links}"
            '<a href="/private/secret">secret</a><a href="https://example.org/x">out</a>'
            f"<p>edition {stats.version}</p></body></html>"
        )
        return web.Response(text=body, content_type="text/html", headers={"ETag": etag})

    async def article(request: web.Request) -> web.Response:
        await asyncio.sleep(slow_ms / 1000)
        n = request.match_info["n"]
        return web.Response(text=f"<title>Article {n}</title><p>{n}</p>", content_type="text/html")

    async def private(request: web.Request) -> web.Response:
        return web.Response(text="<title>secret</title>", content_type="text/html")

    plain_served: Counter[str] = Counter()  # /plain requests per host

    async def plain(request: web.Request) -> web.Response:
        host = request.host.rsplit(":", 1)[0]
        k = plain_served[host]
        plain_served[host] += 1
        if k < len(plain_delays):
            await asyncio.sleep(plain_delays[k])
        n = request.match_info["n"]
        return web.Response(text=f"<title>Plain {n}</title><p>same</p>", content_type="text/html")

    async def cycle(request: web.Request) -> web.Response:
        """Links back to the start, to itself, twice to the next page, and three pages on."""
        n = int(request.match_info["n"])
        hrefs = ["/cycle/0", f"/cycle/{n}", f"/cycle/{n + 1}", f"/cycle/{n + 1}#again",
                 *(f"/cycle/{n + k}" for k in (2, 3, 4))]  # fmt: skip
        links = "".join(f'<a href="{href}">{href}</a>' for href in hrefs)
        return web.Response(text=f"<title>Cycle {n}</title>{links}", content_type="text/html")

    app = web.Application(middlewares=[record])
    app.router.add_get("/cycle/{n}", cycle)
    app.router.add_get("/robots.txt", robots)
    app.router.add_get("/news", news)
    app.router.add_get("/news/{n}", article)
    app.router.add_get("/private/secret", private)
    app.router.add_get("/plain/{n}", plain)
    return app
