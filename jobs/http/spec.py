"""What an HTTP job is asked to do: the request (`POST /jobs/http`'s body, a schedule's job body,
the job's stored arguments), checked by one model everywhere, and what it answers (its result).

The limits a setting puts on a field (HTTP_JOBS_MAX_TIMEOUT, HTTP_JOBS_CONCURRENCY, ...) are
checked when the model is validated with `context={"settings": ...}` (the API does) and applied
again by the worker, which never asks for more than the settings allow.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, TypeVar

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from asyncjobs.settings import Settings
from jobs.scrape.page import MAX_URL_LENGTH

Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
BODILESS = frozenset({"GET", "HEAD"})
MAX_HEADERS = 50
MAX_HEADER_VALUE = 8192
# RFC 9110 token characters
HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}$")
# Framing and hop-by-hop headers are the client's own business; a caller's would break the
# request or smuggle another one. X-Asyncjobs-* are ours: the receiver trusts them.
FORBIDDEN_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
OUR_PREFIX = "x-asyncjobs-"
# Control characters end a header line or confuse parsers (header injection); tab is allowed.
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\u2028\u2029]")
LIMIT_GROUP = r"^[A-Za-z0-9_.:-]{1,100}$"


def check_headers(headers: dict[str, str]) -> dict[str, str]:
    seen: set[str] = set()
    for name, value in headers.items():
        lowered = name.lower()
        if not HEADER_NAME.match(name):
            raise ValueError(f"invalid header name {name!r}")
        if lowered in FORBIDDEN_HEADERS or lowered.startswith(OUR_PREFIX):
            raise ValueError(f"header {name!r} may not be set: the worker sets it, or none may")
        if lowered in seen:
            raise ValueError(f"header {name!r} is given twice")
        if CONTROL.search(value) or len(value) > MAX_HEADER_VALUE:
            raise ValueError(
                f"header {name!r}: a single line of at most {MAX_HEADER_VALUE} characters "
                "(no CR, LF or other control characters)"
            )
        seen.add(lowered)
    return headers


def _settings(info: ValidationInfo) -> Settings | None:
    settings = (info.context or {}).get("settings")
    return settings if isinstance(settings, Settings) else None


N = TypeVar("N", int, float)


def _at_most(value: N | None, ceiling: float | None, setting: str) -> N | None:
    """`value`, unless it is over the setting's ceiling (none, or 0: no ceiling)."""
    if value is not None and ceiling and value > ceiling:
        raise ValueError(f"at most {ceiling:g} ({setting})")
    return value


class HttpCall(BaseModel):
    """One HTTP request to make, retried until it answers a success status."""

    model_config = ConfigDict(extra="forbid", serialize_by_alias=True)

    method: Method = "POST"
    url: AnyHttpUrl = Field(max_length=MAX_URL_LENGTH)
    headers: dict[str, str] = Field(default_factory=dict, max_length=MAX_HEADERS)
    body: str | None = Field(None, description="sent as is, UTF-8 (text/plain unless told)")
    json_body: Any = Field(None, alias="json", description="sent as JSON (application/json)")
    timeout: float | None = Field(
        None, gt=0, le=24 * 3600, description="seconds per request; default HTTP_JOBS_TIMEOUT"
    )
    success_statuses: list[int] | None = Field(
        None, min_length=1, max_length=100, description="statuses that complete the job; 2xx"
    )
    follow_redirects: bool = Field(False, description="also redirects to another host")
    limit_group: str | None = Field(
        None, pattern=LIMIT_GROUP, description="the target its limits count against; its host"
    )
    concurrency: int | None = Field(None, ge=1, le=100_000, description="at once per target")
    rate_per_second: float | None = Field(
        None, gt=0, le=1000, description="request starts per second per target"
    )

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, value: AnyHttpUrl) -> AnyHttpUrl:
        if value.username or value.password:
            raise ValueError("no user:password@ in the URL: send an Authorization header")
        return value

    _headers_ok = field_validator("headers")(check_headers)

    @field_validator("success_statuses")
    @classmethod
    def _statuses(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(not 100 <= status <= 599 for status in value):
            raise ValueError("statuses are 100 to 599")
        return value

    @field_validator("timeout")
    @classmethod
    def _timeout_allowed(cls, value: float | None, info: ValidationInfo) -> float | None:
        settings = _settings(info)
        return _at_most(
            value, settings.http_jobs_max_timeout if settings else None, "HTTP_JOBS_MAX_TIMEOUT"
        )

    @field_validator("concurrency")
    @classmethod
    def _concurrency_allowed(cls, value: int | None, info: ValidationInfo) -> int | None:
        settings = _settings(info)
        return _at_most(
            value, settings.http_jobs_concurrency if settings else None, "HTTP_JOBS_CONCURRENCY"
        )

    @field_validator("rate_per_second")
    @classmethod
    def _rate_allowed(cls, value: float | None, info: ValidationInfo) -> float | None:
        settings = _settings(info)
        ceiling = settings.http_jobs_rate_per_second if settings else None
        return _at_most(value, ceiling, "HTTP_JOBS_RATE_PER_SECOND")

    @model_validator(mode="after")
    def _one_body(self) -> HttpCall:
        if self.body is not None and self.json_body is not None:
            raise ValueError("give at most one of 'body' or 'json'")
        if self.method in BODILESS and (self.body is not None or self.json_body is not None):
            raise ValueError(f"a {self.method} request has no body")
        return self

    def payload(self) -> tuple[bytes, str | None]:
        """The body's bytes, and the Content-Type it goes with unless a header says one."""
        if self.json_body is not None:
            return json.dumps(self.json_body, separators=(",", ":")).encode(), "application/json"
        if self.body is not None:
            return self.body.encode(), "text/plain; charset=utf-8"
        return b"", None

    def is_success(self, status: int) -> bool:
        if self.success_statuses is None:
            return 200 <= status < 300
        return status in self.success_statuses


class HttpAnswer(BaseModel):
    """An HTTP job's result: the answer that completed it."""

    method: Method
    url: str = Field(description="where the answer came from (after same-host redirects)")
    status: int
    headers: dict[str, str] = Field(description="content-type, location, etag and a few more")
    body: str | None = Field(None, description="the body as text, up to body_limit bytes")
    body_base64: str | None = Field(None, description="instead of body: not text")
    body_bytes: int | None = Field(description="the whole body's size; null if cut and unknown")
    body_truncated: bool
    body_limit: int = Field(description="the most bytes of body kept (HTTP_JOBS_RESULT_MAX_BYTES)")
    elapsed_ms: float
    redirects: int = 0

    model_config = ConfigDict(extra="forbid")
