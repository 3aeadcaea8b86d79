"""Every outgoing request of the scraper: the SSRF guard on each redirect hop, per-host
politeness and robots.txt (through Redis), timeouts, size caps and errors a user can read."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from ipaddress import ip_address

import aiohttp
from aiohttp.abc import AbstractResolver
from redis.asyncio import Redis
from yarl import URL

from asyncjobs import tracing
from asyncjobs.deadlines import deadline
from asyncjobs.settings import Settings
from jobs.scrape.errors import FailureReason, ScrapeFailed, ScrapeUnavailable
from jobs.scrape.guard import ForbiddenTargetError, GuardedResolver, check_url
from jobs.scrape.politeness import HostWait, Politeness
from jobs.scrape.robots import RobotsPolicy
from jobs.values import now_utc

HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
ROBOTS_MAX_BYTES = 512 * 1024  # what RFC 9309 asks crawlers to read at least


@dataclass
class FetchedPage:
    final_url: str
    status: int
    content_type: str
    charset: str | None
    body: bytes
    etag: str | None = None
    last_modified: str | None = None
    fetch_ms: float = 0.0  # the request alone
    queued_for_host_ms: float = 0.0  # waiting for the host's turn (politeness), before it

    @property
    def not_modified(self) -> bool:
        return self.status == 304


def make_http_session(
    settings: Settings, dns: AbstractResolver | None = None
) -> aiohttp.ClientSession:
    """The one client session a worker shares across all scrape jobs (one connection pool).

    `dns` replaces the system resolver underneath the guard (tests use one that knows names)."""
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(settings.scrape_allowed_cidrs, inner=dns),
        limit=settings.scrape_max_connections,
        ttl_dns_cache=60,
    )
    return aiohttp.ClientSession(
        connector=connector,
        # the whole request's limit is the Fetcher's deadline (one per request, no timer each)
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.scrape_connect_timeout),
        headers={"User-Agent": settings.scrape_user_agent},
        cookie_jar=aiohttp.DummyCookieJar(),  # jobs must not leak cookies into each other
        trust_env=False,
    )


class Fetcher:
    """Every outgoing request of the scraper: SSRF guard on each redirect hop, per-host
    politeness and robots.txt (both through Redis, when given one), timeouts and size caps."""

    def __init__(
        self, session: aiohttp.ClientSession, settings: Settings, redis: Redis | None = None
    ) -> None:
        self.session = session
        self.settings = settings
        polite = settings.scrape_per_host_concurrency > 0 or settings.scrape_min_host_delay > 0
        # With both limits off there is nothing to keep track of: no Redis round trip per request.
        self.politeness = Politeness(redis, settings) if redis is not None and polite else None
        self.robots = (
            RobotsPolicy(redis, settings.scrape_user_agent, settings.robots_ttl, self.fetch_text)
            if redis is not None
            else None
        )

    async def fetch_page(
        self,
        url: str,
        etag: str | None = None,
        last_modified: str | None = None,
        waiter: str | None = None,
    ) -> FetchedPage:
        """GET an HTML page; conditional when validators of a previous fetch are given. With a
        `waiter` (the job's id) a wait for the host's turn postpones the job (see politeness)."""
        target = URL(url)
        with tracing.client_span("scrape", target):
            page, wait, started = await self._fetch_page(target, etag, last_modified, waiter)
        page.fetch_ms = round((time.perf_counter() - started - wait.in_place_s) * 1000, 1)
        page.queued_for_host_ms = round(wait.queued_s * 1000, 1)
        return page

    async def _fetch_page(
        self, target: URL, etag: str | None, last_modified: str | None, waiter: str | None
    ) -> tuple[FetchedPage, HostWait, float]:
        if self.robots is not None:
            with translate_errors(target, self.settings):
                allowed = await self.robots.allowed(target)
            if not allowed:
                raise ScrapeFailed(FailureReason.ROBOTS, f"disallowed by robots.txt: {target}")
        headers = {}
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        wait = HostWait()
        started = time.perf_counter()
        with translate_errors(target, self.settings):
            async with self._get(target, headers, wait, waiter) as response:
                tracing.set_attribute("http.response.status_code", response.status)
                page = await _read_page(response, self.settings.scrape_max_bytes)
        return page, wait, started

    async def fetch_text(self, url: URL) -> tuple[int, str]:
        """GET any text (robots.txt): status and at most ROBOTS_MAX_BYTES of body."""
        with translate_errors(url, self.settings):
            async with self._get(url, {}, HostWait()) as response:
                body = await response.content.read(ROBOTS_MAX_BYTES)
                return response.status, body.decode("utf-8", errors="replace")
        raise AssertionError("unreachable")  # translate_errors always raises or returns above

    async def fetch_bytes(self, url: str, max_bytes: int, waiter: str | None = None) -> bytes:
        """GET a file (an image): its body, at most `max_bytes`. The guard and politeness
        apply; robots.txt does not (one file a person asked for, as a browser loads it)."""
        target = URL(url)
        with translate_errors(target, self.settings):
            async with self._get(target, {}, HostWait(), waiter) as response:
                _check_status(response)
                return await _read_capped(response, max_bytes, "file")
        raise AssertionError("unreachable")  # translate_errors always raises or returns above

    @contextlib.asynccontextmanager
    async def _get(
        self, url: URL, headers: dict[str, str], wait: HostWait, waiter: str | None = None
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """Follow redirects by hand so that every hop passes the SSRF guard and politeness.
        Each hop's timeout starts once it has its host's slot: waiting for a turn is not the
        request being slow. Only the first hop may postpone the job (later ones would lose it
        the hops before), so only it books a turn."""
        target = url
        for hop in range(self.settings.scrape_max_redirects + 1):
            check_url(
                target, self.settings.scrape_allowed_cidrs, self.settings.scrape_allowed_ports
            )
            async with (
                self._slot(target.host or "", waiter if hop == 0 else None) as waited,
                deadline(self.settings.scrape_timeout),
                self.session.get(target, allow_redirects=False, headers=headers) as r,
            ):
                wait.queued_s += waited.queued_s
                wait.in_place_s += waited.in_place_s
                location = r.headers.get("Location")
                if r.status not in REDIRECT_STATUSES or not location:
                    yield r
                    return
            target = redirect_target(target, location)
        raise ScrapeFailed(
            FailureReason.REDIRECTS, f"more than {self.settings.scrape_max_redirects} redirects"
        )

    def _slot(
        self, host: str, waiter: str | None
    ) -> contextlib.AbstractAsyncContextManager[HostWait]:
        if self.politeness is None:
            return contextlib.nullcontext(HostWait())
        return self.politeness.slot(host, waiter)


# A host name as DNS knows it (after IDNA): labels of letters, digits and hyphens
_HOST_NAME = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?")


def redirect_target(current: URL, location: str) -> URL:
    """Where a redirect leads; a Location no request could be made to (no host, a space or a
    control character in the host, a broken IPv6 literal) fails the job for good instead of
    being retried as a network error."""
    try:
        target = current.join(URL(location, encoded=True))
        host = target.raw_host or ""
    except (ValueError, UnicodeError) as exc:
        raise _bad_redirect(location) from exc
    if target.scheme not in ("http", "https") or not _valid_host(host):
        raise _bad_redirect(location)
    return target


def _bad_redirect(location: str) -> ScrapeFailed:
    return ScrapeFailed(FailureReason.REDIRECTS, f"redirect to an invalid URL {location[:200]!r}")


def _valid_host(host: str) -> bool:
    try:
        ip_address(host.strip("[]"))
        return True
    except ValueError:
        return bool(_HOST_NAME.fullmatch(host))


@contextlib.contextmanager
def translate_errors(target: URL, settings: Settings) -> Iterator[None]:
    """Network errors become job errors a user can read, classified transient or permanent,
    each with its reason."""
    try:
        yield
    except TimeoutError as exc:
        message = f"timed out after {settings.scrape_timeout:g}s: {target}"
        raise ScrapeUnavailable(FailureReason.TIMEOUT, message) from exc
    except ForbiddenTargetError as exc:
        raise _refused(target, exc) from exc
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, ForbiddenTargetError):
            raise _refused(target, exc.os_error) from exc
        # a name that does not resolve may resolve later (DNS outages): transient too
        dns = isinstance(exc, aiohttp.ClientConnectorDNSError)
        reason = FailureReason.DNS if dns else FailureReason.CONNECT
        message = f"could not {'resolve' if dns else 'connect to'} {target.host}: {exc.os_error}"
        raise ScrapeUnavailable(reason, message) from exc
    except aiohttp.ClientError as exc:
        message = f"HTTP error fetching {target}: {type(exc).__name__}: {exc}"
        raise ScrapeUnavailable(FailureReason.NETWORK, message) from exc


def _refused(target: URL, exc: ForbiddenTargetError) -> ScrapeFailed:
    return ScrapeFailed(FailureReason.BLOCKED_BY_GUARD, f"refused to fetch {target}: {exc}")


async def _read_page(response: aiohttp.ClientResponse, max_bytes: int) -> FetchedPage:
    etag, last_modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
    if response.status == 304:
        return FetchedPage(str(response.url), 304, "", None, b"", etag, last_modified)
    _check_status(response)
    if response.content_type not in HTML_TYPES:
        message = f"not an HTML page (Content-Type: {response.content_type})"
        raise ScrapeFailed(FailureReason.NOT_HTML, message)
    body = await _read_capped(response, max_bytes, "page")
    return FetchedPage(
        final_url=str(response.url),
        status=response.status,
        content_type=response.content_type,
        charset=response.charset,
        body=bytes(body),
        etag=etag,
        last_modified=last_modified,
    )


async def _read_capped(response: aiohttp.ClientResponse, max_bytes: int, what: str) -> bytes:
    """The body, refused as soon as it is known to pass `max_bytes` (never read whole first)."""
    too_large = f"{what} is larger than the {max_bytes} byte limit"
    if (response.content_length or 0) > max_bytes:
        raise ScrapeFailed(FailureReason.TOO_BIG, too_large)
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > max_bytes:
            raise ScrapeFailed(FailureReason.TOO_BIG, too_large)
    return bytes(body)


def _check_status(response: aiohttp.ClientResponse) -> None:
    status = response.status
    if 200 <= status < 300:
        return
    reason = f"HTTP {status} {response.reason or ''}".strip()
    message = f"{reason} from {response.url}"
    if status == 429 or status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        kind = FailureReason.HTTP_4XX if status == 429 else FailureReason.HTTP_5XX
        raise ScrapeUnavailable(kind, message, retry_after=retry_after)
    kind = FailureReason.HTTP_4XX if 400 <= status < 500 else FailureReason.HTTP_OTHER
    raise ScrapeFailed(kind, message)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - now_utc()).total_seconds())
