"""The `http` job (the Cloud Tasks model): call a URL with a method, headers and a body, signed,
until it answers a success status.

- Each try sends `X-Asyncjobs-Timestamp` and `X-Asyncjobs-Signature` (asyncjobs.signing, the
  webhooks' scheme, fresh per try), `X-Asyncjobs-Job-Id` and `X-Asyncjobs-Try`, so a receiver
  can refuse forgeries and replays, and deduplicate.
- 2xx, or the request's `success_statuses`, completes the job: its result is the status, a few
  headers and the body up to HTTP_JOBS_RESULT_MAX_BYTES (the result says when it was cut).
- 408, 429, 5xx, timeouts and network errors are retried (Retry-After is a floor); any other
  answer is a permanent failure, dead-lettered with its status and the start of its body.
- Redirects to the same host are followed (each hop through the guard), to another host only
  with `follow_redirects` (and then without the caller's Authorization and Cookie headers).
- Every hop goes through the SSRF guard with the HTTP jobs' own allowlist (jobs/http/session.py)
  and the target's limits (jobs/http/limits.py).
"""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from asyncjobs import tracing
from asyncjobs.deadlines import deadline
from asyncjobs.errors import JobError, PermanentJobError, TransientJobError
from asyncjobs.settings import Settings
from asyncjobs.signing import JOB_ID_HEADER, TRY_HEADER, signed_headers
from jobs.context import WorkerContext
from jobs.http import limits
from jobs.http.spec import HttpAnswer, HttpCall, Method
from jobs.retry import builtin, report
from jobs.scrape.fetch import parse_retry_after, redirect_target
from jobs.scrape.guard import ForbiddenTargetError, check_url

MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
# What a result keeps of the answer's headers: what a caller acts on, nothing it could not log.
KEPT_HEADERS = (
    "Content-Type", "Content-Length", "Content-Location", "Location", "ETag",
    "Last-Modified", "Retry-After", "Cache-Control", "X-Request-Id",
)  # fmt: skip
CREDENTIALS = frozenset({"authorization", "cookie"})  # not sent on to another host
ERROR_BODY_CHARS = 2048  # of a permanent failure's body, in its error (the dead letter)
RETRY_BODY_CHARS = 300  # of a transient one's, in the error GET /jobs/{id} shows meanwhile
TRANSIENT_STATUSES = frozenset({408, 429})


@dataclass(frozen=True)
class Hop:
    """One request of the job: the first, or a redirect's."""

    method: Method
    url: URL
    body: bytes
    headers: dict[str, str]

    def where(self) -> str:
        """For messages and logs: the URL without its query, which may carry a token."""
        return f"{self.method} {self.url.with_query(None).with_fragment(None)}"


@builtin(
    "http", "http", endpoint="http", schedulable=True, arguments=HttpCall, shown=("method", "url")
)
async def http(ctx: WorkerContext, **call: Any) -> dict[str, Any]:
    """Call a URL (method, headers, body), signed; the answer's status, headers and body."""
    spec = HttpCall.model_validate(call)
    settings = ctx.settings
    secret = settings.http_jobs_signing_secret
    if secret is None:
        raise PermanentJobError("HTTP_JOBS_SECRET (or WEBHOOK_SECRET) is not set: cannot sign")
    timeout = min(spec.timeout or settings.http_jobs_timeout, settings.http_jobs_max_timeout)
    answer = await call_url(ctx, spec, secret.get_secret_value(), timeout)
    where = Hop(answer.method, URL(answer.url), b"", {}).where()
    report(
        f"{where} -> {answer.status} ({answer.elapsed_ms:.0f} ms)",
        method=answer.method, url=where.partition(" ")[2], status=answer.status,
    )  # fmt: skip
    unused = "body_base64" if answer.body_base64 is None else "body"
    return answer.model_dump(mode="json", exclude={unused})


async def call_url(ctx: WorkerContext, spec: HttpCall, secret: str, timeout: float) -> HttpAnswer:
    """Send the request, following the redirects it may follow; the answer that completes the
    job, else a TransientJobError or PermanentJobError saying why."""
    settings = ctx.settings
    hop = first_hop(spec)
    target_limits = limits.limits_of(spec, settings, timeout)
    started = time.perf_counter()
    with tracing.client_span("http job", hop.url, **{"http.request.method": hop.method}):
        for redirects in range(MAX_REDIRECTS + 1):
            # only the first hop may postpone the job: later ones would lose the hops before
            waiter = ctx.waiter if redirects == 0 else None
            with classified_errors(hop, timeout):
                check_url(
                    hop.url, settings.http_jobs_allowed_cidrs, settings.http_jobs_allowed_ports
                )
                async with (
                    limits.slot(ctx.redis, settings, spec, hop.url, target_limits, waiter),
                    deadline(timeout),  # from the target's turn on: waiting is not slowness
                    ctx.http_jobs.request(
                        hop.method, hop.url, data=hop.body or None,
                        headers=sent_headers(hop, secret, ctx), allow_redirects=False,
                    ) as response,
                ):  # fmt: skip
                    tracing.set_attribute("http.response.status_code", response.status)
                    location = response.headers.get("Location")
                    if spec.is_success(response.status) or not is_redirect(
                        response.status, location
                    ):
                        return await answer_of(response, spec, hop, started, redirects, settings)
            hop = redirected(hop, response.status, location or "", spec)
        raise PermanentJobError(
            f"more than {MAX_REDIRECTS} redirects from {first_hop(spec).where()}"
        )


def first_hop(spec: HttpCall) -> Hop:
    body, content_type = spec.payload()
    headers = dict(spec.headers)
    if content_type and not any(name.lower() == "content-type" for name in headers):
        headers["Content-Type"] = content_type
    return Hop(spec.method, URL(str(spec.url)), body, headers)


def sent_headers(hop: Hop, secret: str, ctx: WorkerContext) -> dict[str, str]:
    """The caller's headers, the signature (a fresh timestamp each time) and who is calling."""
    return {
        **tracing.outbound_headers(),  # traceparent, when tracing
        **hop.headers,
        **signed_headers(secret, hop.body),
        JOB_ID_HEADER: ctx.job_id,
        TRY_HEADER: str(ctx.job_try),
    }


def is_redirect(status: int, location: str | None) -> bool:
    return status in REDIRECTS and bool(location)


def redirected(hop: Hop, status: int, location: str, spec: HttpCall) -> Hop:
    """The next hop, as browsers make it: 303 (and 301/302 after a POST) becomes a bodiless
    GET; 307 and 308 repeat the request. Another host only with `follow_redirects`."""
    target = redirect_target(hop.url, location)
    same_host = (target.host or "").lower() == (hop.url.host or "").lower()
    if not same_host and not spec.follow_redirects:
        raise PermanentJobError(
            f"HTTP {status} from {hop.where()} to another host, {target.host}: not followed "
            "(set follow_redirects to follow it)"
        )
    headers = hop.headers
    if not same_host:
        headers = {k: v for k, v in headers.items() if k.lower() not in CREDENTIALS}
    if status == 303 or (status in (301, 302) and hop.method == "POST"):
        method: Method = "HEAD" if hop.method == "HEAD" else "GET"
        headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
        return Hop(method, target, b"", headers)
    return replace(hop, url=target, headers=headers)


async def answer_of(
    response: aiohttp.ClientResponse,
    spec: HttpCall,
    hop: Hop,
    started: float,
    redirects: int,
    settings: Settings,
) -> HttpAnswer:
    """The job's result for a success; else the error that fails this try."""
    limit = settings.http_jobs_result_max_bytes
    data, truncated = await read_capped(response, limit)
    status = response.status
    if not spec.is_success(status):
        raise failure(status, hop, response.headers, data, truncated)
    return HttpAnswer(
        method=hop.method,
        url=str(response.url),
        status=status,
        headers={n.lower(): v for n in KEPT_HEADERS if (v := response.headers.get(n)) is not None},
        **body_fields(data, response.charset, response.content_type),
        body_bytes=response.content_length if truncated else len(data),
        body_truncated=truncated,
        body_limit=limit,
        elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
        redirects=redirects,
    )


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """At most `limit` bytes of the body, and whether there was more (the rest is not read)."""
    data = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > limit:
            return bytes(data[:limit]), True
    return bytes(data), False


def body_fields(data: bytes, charset: str | None, content_type: str) -> dict[str, str]:
    """{"body": text} when the body reads as text (its charset, else UTF-8), else base64."""
    try:
        return {"body": data.decode(charset or "utf-8")}
    except (UnicodeDecodeError, LookupError):
        if content_type.startswith("text/") or "json" in content_type or "xml" in content_type:
            return {"body": data.decode("utf-8", errors="replace")}  # cut mid-character, or lying
        return {"body_base64": base64.b64encode(data).decode()}


def failure(
    status: int, hop: Hop, headers: CIMultiDictProxy[str], data: bytes, truncated: bool
) -> JobError:
    """A status that does not complete the job: transient (408, 429, 5xx) or permanent, with
    the start of the answer's body (its status and body are what the dead letter keeps)."""
    text = data.decode("utf-8", errors="replace")
    if status in TRANSIENT_STATUSES or status >= 500:
        retry_after = parse_retry_after(headers.get("Retry-After"))
        message = _with_body(f"HTTP {status} from {hop.where()}", text, RETRY_BODY_CHARS, False)
        return TransientJobError(message, retry_after=retry_after)
    message = _with_body(f"HTTP {status} from {hop.where()}", text, ERROR_BODY_CHARS, truncated)
    return PermanentJobError(message)


def _with_body(message: str, text: str, chars: int, truncated: bool) -> str:
    if not text.strip():
        return message
    cut = truncated or len(text) > chars
    return f"{message}: {text[:chars]}{' [cut]' if cut else ''}"


@contextlib.contextmanager
def classified_errors(hop: Hop, timeout: float) -> Iterator[None]:
    """Network errors become job errors a user can read: transient, unless the guard refused
    the target or the URL cannot be requested (permanent). Job errors pass as they are."""
    try:
        yield
    except TimeoutError as exc:
        raise TransientJobError(f"timed out after {timeout:g}s: {hop.where()}") from exc
    except ForbiddenTargetError as exc:
        raise PermanentJobError(f"refused to call {hop.where()}: {exc}") from exc
    except aiohttp.InvalidURL as exc:
        raise PermanentJobError(f"cannot call {hop.where()}: invalid URL") from exc
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, ForbiddenTargetError):
            raise PermanentJobError(f"refused to call {hop.where()}: {exc.os_error}") from exc
        raise TransientJobError(
            f"could not connect to {hop.url.host}:{hop.url.port}: {exc.os_error}"
        ) from exc
    except aiohttp.ClientResponseError as exc:  # a malformed answer; its text names the full URL
        raise TransientJobError(
            f"HTTP error calling {hop.where()}: {type(exc).__name__}: {exc.message}"
        ) from exc
    except aiohttp.ClientError as exc:
        raise TransientJobError(
            f"HTTP error calling {hop.where()}: {type(exc).__name__}: {exc}"
        ) from exc
