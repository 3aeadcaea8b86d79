"""Scrape jobs: fetch one page safely (SSRF guard, timeouts, size cap), summarize it, save it."""

from __future__ import annotations

import asyncio
import codecs
import logging
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Annotated, Any

import aiohttp
from pydantic import AfterValidator, AnyHttpUrl, BaseModel, ConfigDict, Field
from yarl import URL

from app.settings import Settings
from jobs.documents import (
    DocumentSnapshot,
    content_hash,
    document_id,
    now_utc,
    save_document,
)
from jobs.errors import PermanentJobError, TransientJobError
from jobs.html import is_valid_selector, summarize_html
from jobs.netguard import ForbiddenTargetError, GuardedResolver, check_url
from jobs.retry import classified

log = logging.getLogger(__name__)

HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_URL_LENGTH = 2048
MAX_SELECTORS = 50
# Parsing a big page takes long enough to stall other jobs in the loop: do it in a thread.
PARSE_IN_THREAD_BYTES = 256 * 1024


def check_selectors(selectors: dict[str, str]) -> dict[str, str]:
    for name, css in selectors.items():
        if not 1 <= len(name) <= 64:
            raise ValueError(f"selector name {name!r} must be 1 to 64 characters")
        if len(css) > 512 or not is_valid_selector(css):
            raise ValueError(f"selector {name!r} is not a valid CSS selector: {css!r}")
    return selectors


# Named CSS selectors whose matches a scrape job extracts: {"headline": "h1", ...}.
Selectors = Annotated[
    dict[str, str], Field(max_length=MAX_SELECTORS), AfterValidator(check_selectors)
]


class ScrapeTarget(BaseModel):
    """The argument of one scrape job."""

    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl = Field(max_length=MAX_URL_LENGTH)
    selectors: Selectors = Field(default_factory=dict)


@dataclass
class FetchedPage:
    final_url: str
    status: int
    content_type: str
    charset: str | None
    body: bytes


def make_http_session(settings: Settings) -> aiohttp.ClientSession:
    """The one client session a worker shares across all scrape jobs (one connection pool)."""
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(settings.scrape_allowed_cidrs),
        limit=settings.scrape_max_connections,
        ttl_dns_cache=60,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(
            total=settings.scrape_timeout, sock_connect=settings.scrape_connect_timeout
        ),
        headers={"User-Agent": settings.scrape_user_agent},
        cookie_jar=aiohttp.DummyCookieJar(),  # jobs must not leak cookies into each other
        trust_env=False,
    )


async def fetch_page(session: aiohttp.ClientSession, url: str, settings: Settings) -> FetchedPage:
    """GET `url`, following redirects by hand so every hop passes the SSRF guard."""
    target = URL(url)
    try:
        async with asyncio.timeout(settings.scrape_timeout):
            for _ in range(settings.scrape_max_redirects + 1):
                check_url(target, settings.scrape_allowed_cidrs)
                async with session.get(target, allow_redirects=False) as response:
                    location = response.headers.get("Location")
                    if response.status in REDIRECT_STATUSES and location:
                        target = target.join(URL(location, encoded=True))
                        continue
                    return await _read_page(response, settings.scrape_max_bytes)
            raise PermanentJobError(f"more than {settings.scrape_max_redirects} redirects")
    except TimeoutError as exc:
        raise TransientJobError(f"timed out after {settings.scrape_timeout:g}s: {target}") from exc
    except ForbiddenTargetError as exc:
        raise PermanentJobError(f"refused to fetch {target}: {exc}") from exc
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, ForbiddenTargetError):
            raise PermanentJobError(f"refused to fetch {target}: {exc.os_error}") from exc
        raise TransientJobError(f"could not connect to {target.host}: {exc.os_error}") from exc
    except aiohttp.ClientError as exc:
        raise TransientJobError(
            f"HTTP error fetching {target}: {type(exc).__name__}: {exc}"
        ) from exc


async def _read_page(response: aiohttp.ClientResponse, max_bytes: int) -> FetchedPage:
    _check_status(response)
    if response.content_type not in HTML_TYPES:
        raise PermanentJobError(f"not an HTML page (Content-Type: {response.content_type})")
    if (response.content_length or 0) > max_bytes:
        raise PermanentJobError(f"page is larger than the {max_bytes} byte limit")
    body = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        body += chunk
        if len(body) > max_bytes:
            raise PermanentJobError(f"page is larger than the {max_bytes} byte limit")
    return FetchedPage(
        final_url=str(response.url),
        status=response.status,
        content_type=response.content_type,
        charset=response.charset,
        body=bytes(body),
    )


def _check_status(response: aiohttp.ClientResponse) -> None:
    status = response.status
    if 200 <= status < 300:
        return
    reason = f"HTTP {status} {response.reason or ''}".strip()
    if status == 429 or status >= 500:
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        raise TransientJobError(f"{reason} from {response.url}", retry_after=retry_after)
    raise PermanentJobError(f"{reason} from {response.url}")


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


def decode_body(body: bytes, charset: str | None) -> str:
    try:
        codec = codecs.lookup(charset or "utf-8").name
    except LookupError:
        codec = "utf-8"
    return body.decode(codec, errors="replace")


@classified("scrape")
async def scrape(ctx: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    """arq job: fetch, summarize and save one page; returns the summary."""
    return await scrape_page(ctx, target)


async def scrape_page(ctx: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    """Fetch, summarize and save one page with the worker's shared clients in `ctx`."""
    settings: Settings = ctx["settings"]
    spec = ScrapeTarget.model_validate(target)
    started = time.perf_counter()
    page = await fetch_page(ctx["http"], str(spec.url), settings)
    fetch_ms = round((time.perf_counter() - started) * 1000, 1)
    html = decode_body(page.body, page.charset)
    if len(page.body) > PARSE_IN_THREAD_BYTES:
        summary = await asyncio.to_thread(summarize_html, html, spec.selectors)
    else:
        summary = summarize_html(html, spec.selectors)
    snapshot = DocumentSnapshot(
        url=str(spec.url),
        final_url=page.final_url,
        status=page.status,
        content_type=page.content_type,
        title=summary.title,
        description=summary.description,
        links_count=summary.links_count,
        text_length=len(summary.text),
        text=summary.text[: settings.scrape_text_max_chars],
        content_hash=content_hash(summary.text),
        extracted=summary.extracted,
        fetched_at=now_utc(),
        fetch_ms=fetch_ms,
    )
    changed = await save_document(ctx["redis"], snapshot, settings.scrape_keep_versions)
    doc_id = document_id(snapshot.url)
    log.info(
        "scraped %s -> %s (%d chars, %.0f ms)", spec.url, page.status, len(summary.text), fetch_ms
    )
    return {
        "document_id": doc_id,
        "changed": changed,
        **snapshot.model_dump(mode="json", exclude={"text", "content_type"}),
    }
