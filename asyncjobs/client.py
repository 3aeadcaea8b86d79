"""A typed client of the service's HTTP API: `Client` (asyncio, aiohttp) and `SyncClient` (the
same client run on a private event loop in a background thread, for sync code such as a Django
view).

    from asyncjobs.client import Client, SyncClient

    async with Client("https://jobs.example.com", api_key) as client:
        job_id = await client.enqueue("generate_invoice", order_id=42, priority="bulk")
        invoice = await client.wait(job_id, timeout=30)
        # or both at once; a function declared with `@job` may stand for its name
        invoice = await client.run(generate_invoice, order_id=42)

    with SyncClient("https://jobs.example.com", api_key) as client:
        job_id = client.enqueue("generate_invoice", order_id=42)
        print(client.status(job_id).status)  # a JobState: JobState.QUEUED, ...
        invoice = client.wait(job_id, timeout=30)

An answer is safe to act on: every enqueue carries an `Idempotency-Key` (a fresh one unless the
caller gives one), and the client retries an enqueue (a 503, or a request that got no answer)
only with that same key and the same body, so a retry never enqueues a job twice. A 4xx is
never retried. Errors are `AsyncJobsError`s; one raised by `enqueue` carries the
`idempotency_key` it used, so the caller can try again later without a risk of a duplicate.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import aiohttp

from asyncjobs.jobstate import FINISHED, JobState
from asyncjobs.registry import JOB_NAME_ATTRIBUTE

__all__ = [
    "FINISHED",
    "UNKNOWN",
    "AsyncJobsError",
    "Client",
    "ClientRequestError",
    "JobFailed",
    "JobStatus",
    "NotFound",
    "RateLimited",
    "ServerError",
    "ServiceUnavailable",
    "SyncClient",
    "TransportError",
    "ValidationFailed",
    "WaitTimeout",
]

T = TypeVar("T")

# A `JobStatus.status` no answer has told yet (a `wait` whose every poll failed): not a state
# of the service's, so not a JobState.
UNKNOWN = "unknown"
MAX_BACKOFF = 5.0  # seconds between two tries of one request, when the server names no time
MAX_POLL_INTERVAL = 1.0  # `wait` polls more and more slowly, up to once a second
MIN_POLL_TIMEOUT = 0.5  # the last poll of a `wait` may run this long past its deadline
MAX_IDEMPOTENCY_KEY_LENGTH = 255


# -- errors ---------------------------------------------------------------------------------------


class AsyncJobsError(Exception):
    """Any failure of a call: `status` is the HTTP status (None when there was no answer),
    `code` the API's error code, `details` the API's `[{"field", "message"}]`."""

    status: int | None
    code: str | None
    message: str
    details: list[dict[str, str]]
    idempotency_key: str | None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        details: list[dict[str, str]] | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.details = list(details or [])
        self.idempotency_key = None
        super().__init__(self._describe())

    def _describe(self) -> str:
        head = " ".join(str(part) for part in (self.status, self.code) if part is not None)
        text = f"{head}: {self.message}" if head else self.message
        if self.details:
            fields = "; ".join(
                f"{d.get('field', '?')}: {d.get('message', '')}" for d in self.details
            )
            text = f"{text} ({fields})"
        return text


class TransportError(AsyncJobsError):
    """No answer: the connection failed or the request timed out. Whether the request reached
    the server is unknown (an enqueue may be sent again with the same idempotency key)."""


class EnqueuedJob(str):
    """A job's id as `enqueue` returns it: a plain `str`, which also says whether it names a
    job that was already there (its `unique_key` was held: nothing new was enqueued)."""

    existing: bool

    def __new__(cls, job_id: str, existing: bool = False) -> EnqueuedJob:
        self = super().__new__(cls, job_id)
        self.existing = existing
        return self


class ClientRequestError(AsyncJobsError):
    """A 4xx answer: the request is wrong and is not retried."""


class ValidationFailed(ClientRequestError):
    """422: `details` names each field that is wrong."""


class NotFound(ClientRequestError):
    """404: no such job (or no such endpoint)."""


class RateLimited(ClientRequestError):
    """429: the caller's rate limit is spent; `retry_after` seconds until it may call again."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kw)


class ServerError(AsyncJobsError):
    """A 5xx answer."""


class ServiceUnavailable(ServerError):
    """503 (after the client's own retries, for the calls it retries); `retry_after` seconds
    when the server said how long to wait."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        self.retry_after = retry_after
        super().__init__(message, **kw)


class JobFailed(AsyncJobsError):
    """The job waited for ended `failed` or `aborted`; `job.error` says why."""

    def __init__(self, job: JobStatus) -> None:
        self.job = job
        super().__init__(f"job {job.job_id} {job.status}: {job.error or 'no error given'}")


class WaitTimeout(AsyncJobsError):
    """The deadline of a `wait` passed before the job finished; `job` is its last known state
    (status UNKNOWN when no poll was answered)."""

    def __init__(self, job: JobStatus, timeout: float) -> None:
        self.job = job
        super().__init__(f"job {job.job_id} not finished after {timeout:g} s ({job.status})")


# -- job status -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobStatus:
    """A job's state as `GET /jobs/{job_id}` tells it; `raw` is the whole answer."""

    job_id: str
    # A JobState; UNKNOWN without an answer, or as the server said it if this client does not
    # know the state (a newer server's).
    status: JobState | str
    function: str | None = None
    result: Any = field(default=None, hash=False)
    error: str | None = None
    tries: int = 0
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, hash=False)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @classmethod
    def from_json(cls, data: Mapping[str, Any], job_id: str) -> JobStatus:
        function, error, tries = data.get("function"), data.get("error"), data.get("tries")
        return cls(
            job_id=str(data.get("job_id") or job_id),
            status=_state(data.get("status")),
            function=None if function is None else str(function),
            result=data.get("result"),
            error=None if error is None else str(error),
            tries=tries if isinstance(tries, int) else 0,
            raw=dict(data),
        )


_STATES = {state.value: state for state in JobState}


def _state(value: object) -> JobState | str:
    """A status as an answer tells it: its JobState; UNKNOWN for none, and a state this
    client does not know as it is."""
    text = str(value or UNKNOWN)
    return _STATES.get(text, text)


# -- the async client -----------------------------------------------------------------------------


@dataclass
class _Answer:
    status: int
    body: Any  # the parsed JSON, or None when the body is empty or not JSON
    text: str
    headers: Mapping[str, str]


class Client:
    """The async client. One `aiohttp.ClientSession` (made on first use unless `session` is
    given; a given session is the caller's to close). `timeout` bounds each HTTP request;
    `retries_503` is how many times an enqueue or a status request is tried again after a 503
    or a request without an answer."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries_503: int = 3,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if retries_503 < 0:
            raise ValueError("retries_503 must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries_503 = retries_503
        self._api_key = api_key
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    # -- the API ---------------------------------------------------------------------------------

    async def enqueue(
        self,
        job: str | Callable[..., Any],
        /,
        *,
        run_at: datetime | None = None,
        delay_seconds: float | None = None,
        priority: str | None = None,
        callback_url: str | None = None,
        unique_key: str | None = None,
        unique_window_seconds: float | None = None,
        after: Sequence[str] | None = None,
        allow_failure: bool = False,
        then: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        **arguments: Any,
    ) -> EnqueuedJob:
        """Enqueue a job (by name, or the function declared as the job) with its arguments;
        return its id (an EnqueuedJob: a str whose `existing` says it was already there).
        Tried again on a 503 or on no answer, always with the same Idempotency-Key and body.
        With `unique_key`, while a job of this type enqueued by this API key with the same key
        is still queued, deferred, running or waiting for a retry (within
        `unique_window_seconds`, the server's default an hour), that job's id. With `after`
        (job ids), the job waits until they have all completed (cancelled if one fails for
        good, unless `allow_failure`); `then` ({"type", "body", "options"}) is a follow-up
        enqueued with it, run with its result once it completes (docs/api.md)."""
        name = job if isinstance(job, str) else getattr(job, JOB_NAME_ATTRIBUTE, job.__name__)
        key = uuid.uuid4().hex if idempotency_key is None else idempotency_key
        _check_idempotency_key(key)
        body = dict(arguments)
        if isinstance(after, str):
            raise TypeError("after takes a list of job ids, not one string")
        if run_at is not None:
            if run_at.utcoffset() is None:
                raise ValueError("run_at needs a time zone (e.g. datetime.now(UTC))")
            body["run_at"] = run_at.isoformat()
        options = {
            "delay_seconds": delay_seconds,
            "priority": priority,
            "callback_url": callback_url,
            "unique_key": unique_key,
            "unique_window_seconds": unique_window_seconds,
            "after": list(after) if after is not None else None,
            "allow_failure": allow_failure or None,  # false is the server's default
            "then": dict(then) if then is not None else None,
        }
        body.update({option: value for option, value in options.items() if value is not None})
        data = json.dumps(body, default=_json_default, separators=(",", ":")).encode()
        try:
            answer = await self._request(
                "POST",
                f"/jobs/{_segment(name)}",
                data=data,
                headers={"Idempotency-Key": key, "Content-Type": "application/json"},
                retry=True,
            )
            reply = answer.body if isinstance(answer.body, dict) else {}
            job_id = reply.get("job_id")
            if not isinstance(job_id, str):
                raise AsyncJobsError(
                    f"the enqueue answer has no job_id: {answer.text[:200]!r}",
                    status=answer.status,
                )
        except AsyncJobsError as exc:
            exc.idempotency_key = key
            raise
        return EnqueuedJob(job_id, existing=reply.get("existing") is True)

    async def status(self, job_id: str) -> JobStatus:
        """The job's state; status NOT_FOUND for a job the server does not know (any more)."""
        return await self._status(job_id, deadline=None)

    async def abort(self, job_id: str) -> None:
        """Ask the workers to abort a queued, deferred or running job. NotFound for an unknown
        job; ClientRequestError (409) for a job already finished. Never retried."""
        await self._request("DELETE", f"/jobs/{_segment(job_id)}", retry=False)

    async def wait(self, job_id: str, *, timeout: float = 60.0, poll_interval: float = 0.2) -> Any:
        """Poll until the job finishes and return its result. JobFailed if it failed or was
        aborted, NotFound if the server does not know it, WaitTimeout once `timeout` seconds
        have passed. A 503 or a poll without an answer is just polled again."""
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        interval = poll_interval
        job = JobStatus(job_id=job_id, status=UNKNOWN)
        while True:
            try:
                job = await self._status(job_id, deadline=deadline)
            except (ServiceUnavailable, TransportError) as exc:
                if loop.time() >= deadline:
                    raise WaitTimeout(job, timeout) from exc
            else:
                if job.status == JobState.COMPLETE:
                    return job.result
                if job.status in FINISHED:
                    raise JobFailed(job)
                if job.status == JobState.NOT_FOUND:
                    raise NotFound(f"no job {job_id}", status=404, code="not_found")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise WaitTimeout(job, timeout)
            await asyncio.sleep(min(interval, remaining))
            interval = min(interval * 2, max(MAX_POLL_INTERVAL, poll_interval))

    async def run(
        self, job: str | Callable[..., Any], /, *, timeout: float = 60.0, **kwargs: Any
    ) -> Any:
        """Enqueue (`kwargs`: the job's arguments and enqueue options) and wait for the result;
        `timeout` bounds the wait."""
        job_id = await self.enqueue(job, **kwargs)
        return await self.wait(job_id, timeout=timeout)

    # -- HTTP ------------------------------------------------------------------------------------

    async def _status(self, job_id: str, *, deadline: float | None) -> JobStatus:
        answer = await self._request(
            "GET", f"/jobs/{_segment(job_id)}", retry=True, deadline=deadline, also=(404,)
        )
        if answer.status == 404:
            # the API's "unknown job" is a 404 with the status shape; any other 404 is an error
            if isinstance(answer.body, dict) and answer.body.get("status") == JobState.NOT_FOUND:
                return JobStatus.from_json(answer.body, job_id)
            raise _error_for(answer)
        if not isinstance(answer.body, dict):
            raise AsyncJobsError(
                f"the status answer is not a JSON object: {answer.text[:200]!r}",
                status=answer.status,
            )
        return JobStatus.from_json(answer.body, job_id)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
            self._owns_session = True
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool,
        deadline: float | None = None,
        also: tuple[int, ...] = (),
    ) -> _Answer:
        """Send one request; with `retry`, try again (the same bytes, the same headers) after a
        503 or no answer, at most `retries_503` times and never past `deadline` (loop time).
        `retry` is only for requests that are safe to repeat: a GET, or a POST carrying an
        Idempotency-Key. Return a 2xx answer (or one whose status is in `also`); raise the
        matching AsyncJobsError otherwise."""
        loop = asyncio.get_running_loop()
        sent = {"Accept": "application/json", **(headers or {})}
        if self._api_key is not None:
            sent["Authorization"] = f"Bearer {self._api_key}"
        url = self.base_url + path
        attempt = 0
        while True:
            limit = self.timeout
            if deadline is not None:
                limit = min(limit, max(deadline - loop.time(), MIN_POLL_TIMEOUT))
            try:
                answer = await self._send(method, url, data, sent, limit)
            except (aiohttp.InvalidURL, aiohttp.ClientSSLError) as exc:
                raise TransportError(f"{method} {url}: {exc!r}") from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                failure: AsyncJobsError = TransportError(f"{method} {url}: {exc!r}")
                delay = None
                cause: BaseException | None = exc
            else:
                if 200 <= answer.status < 300 or answer.status in also:
                    return answer
                failure = _error_for(answer)
                cause = None
                if not isinstance(failure, ServiceUnavailable):
                    raise failure
                delay = failure.retry_after
            backoff = min(0.2 * 2**attempt, MAX_BACKOFF)
            sleep = backoff if delay is None else delay
            if (
                not retry
                or attempt >= self.retries_503
                # the server asks for more patience than one request is given: the caller decides
                or (delay is not None and delay > self.timeout)
                or (deadline is not None and loop.time() + sleep >= deadline)
            ):
                raise failure from cause
            attempt += 1
            await asyncio.sleep(sleep)

    async def _send(
        self, method: str, url: str, data: bytes | None, headers: Mapping[str, str], limit: float
    ) -> _Answer:
        session = self._get_session()
        async with session.request(
            method,
            url,
            data=data,
            headers=dict(headers),
            timeout=aiohttp.ClientTimeout(total=limit),
            allow_redirects=False,
        ) as response:
            raw = await response.read()
            text = raw.decode("utf-8", "replace")
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            return _Answer(response.status, body, text, dict(response.headers))


def _error_for(answer: _Answer) -> AsyncJobsError:
    body = answer.body if isinstance(answer.body, dict) else {}
    code = body.get("error")
    message = body.get("message")
    if not isinstance(message, str) or not message:
        message = answer.text[:200] or f"HTTP {answer.status}"
    details = [
        {str(k): str(v) for k, v in item.items()}
        for item in body.get("details") or []
        if isinstance(item, dict)
    ]
    kw: dict[str, Any] = {
        "status": answer.status,
        "code": code if isinstance(code, str) else None,
        "details": details,
    }
    status = answer.status
    error: AsyncJobsError
    if status == 422:
        error = ValidationFailed(message, **kw)
    elif status == 429:
        error = RateLimited(message, retry_after=_retry_after(answer.headers), **kw)
    elif status == 404:
        error = NotFound(message, **kw)
    elif 400 <= status < 500:
        error = ClientRequestError(message, **kw)
    elif status == 503:
        error = ServiceUnavailable(message, retry_after=_retry_after(answer.headers), **kw)
    elif status >= 500:
        error = ServerError(message, **kw)
    else:  # a redirect or another status the API never answers
        error = AsyncJobsError(message, **kw)
    return error


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:  # the other form HTTP allows: a date
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if seconds == seconds else None  # (NaN is no answer)


def _check_idempotency_key(key: str) -> None:
    if not (1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH and key.isascii() and key.isprintable()):
        raise ValueError("an idempotency key is 1 to 255 printable ASCII characters")


def _segment(value: str) -> str:
    if not value:
        raise ValueError("a job name or id cannot be empty")
    return quote(value, safe="")


def _json_default(value: object) -> object:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# -- the sync client ------------------------------------------------------------------------------


class SyncClient:
    """The same calls as `Client`, blocking. Each SyncClient runs one `Client` on a private
    event loop in a daemon thread, started on the first call and stopped by `close()` (or the
    `with` block's end). It may be shared by threads (e.g. a threaded WSGI server's)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries_503: int = 3,
    ) -> None:
        self._client = Client(base_url, api_key, timeout=timeout, retries_503=retries_503)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def enqueue(
        self,
        job: str | Callable[..., Any],
        /,
        *,
        run_at: datetime | None = None,
        delay_seconds: float | None = None,
        priority: str | None = None,
        callback_url: str | None = None,
        unique_key: str | None = None,
        unique_window_seconds: float | None = None,
        after: Sequence[str] | None = None,
        allow_failure: bool = False,
        then: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        **arguments: Any,
    ) -> EnqueuedJob:
        return self._call(
            lambda client: client.enqueue(
                job,
                run_at=run_at,
                delay_seconds=delay_seconds,
                priority=priority,
                callback_url=callback_url,
                unique_key=unique_key,
                unique_window_seconds=unique_window_seconds,
                after=after,
                allow_failure=allow_failure,
                then=then,
                idempotency_key=idempotency_key,
                **arguments,
            )
        )

    def status(self, job_id: str) -> JobStatus:
        return self._call(lambda client: client.status(job_id))

    def abort(self, job_id: str) -> None:
        self._call(lambda client: client.abort(job_id))

    def wait(self, job_id: str, *, timeout: float = 60.0, poll_interval: float = 0.2) -> Any:
        return self._call(
            lambda client: client.wait(job_id, timeout=timeout, poll_interval=poll_interval)
        )

    def run(self, job: str | Callable[..., Any], /, *, timeout: float = 60.0, **kwargs: Any) -> Any:
        return self._call(lambda client: client.run(job, timeout=timeout, **kwargs))

    def close(self) -> None:
        """Close the HTTP session and stop the loop's thread. Calls after this raise."""
        with self._lock:
            self._closed = True
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._client.close(), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise RuntimeError("this SyncClient is closed")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="asyncjobs-client", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            if threading.current_thread() is self._thread:
                raise RuntimeError("a SyncClient cannot be called from its own event loop")
            return self._loop

    def _call(self, call: Callable[[Client], Coroutine[Any, Any, T]]) -> T:
        loop = self._start()
        future = asyncio.run_coroutine_threadsafe(call(self._client), loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # (a KeyboardInterrupt in this thread stops the call too)
            raise
