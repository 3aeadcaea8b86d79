"""Email attachments: what a request may give (the bytes in base64, a URL the worker fetches,
or one of this service's exports), their checks, how the worker gets their bytes, and their
MIME parts.

Sizes are bytes before base64: each attachment within MAIL_MAX_ATTACHMENT_BYTES, all of a
message's within MAIL_MAX_TOTAL_ATTACHMENT_BYTES. Inline ones are checked by the API (and they
must fit in the request body, MAX_BODY_BYTES); a URL's size is known when the worker fetches it,
through the scraper's SSRF guard and politeness, and it is refused as soon as it passes the cap.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import mimetypes
import re
from collections.abc import Sequence
from email.message import EmailMessage, Message
from typing import Any
from urllib.parse import quote

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from yarl import URL

from asyncjobs.arqcompat import job_key_prefix
from asyncjobs.errors import JobError, PermanentJobError, TransientJobError
from asyncjobs.settings import Settings
from jobs.context import WorkerContext
from jobs.engine.dependencies import THEN_SUFFIX
from jobs.housekeeping.export import EXPORT_NAME_PATTERN
from jobs.scrape.guard import ForbiddenTargetError, check_url
from jobs.scrape.page import MAX_URL_LENGTH

MAX_ATTACHMENTS = 20
MAX_FILENAME_CHARS = 255
# Without settings in the validation context (see jobs.mail.email.validation_context): theirs.
_DEFAULTS = Settings.model_fields
DEFAULT_MAX_BYTES: int = _DEFAULTS["mail_max_attachment_bytes"].default
DEFAULT_MAX_TOTAL_BYTES: int = _DEFAULTS["mail_max_total_attachment_bytes"].default
DEFAULT_PORTS: list[int] | None = _DEFAULTS["scrape_allowed_ports"].default

_EXPORT_URL = re.compile(rf"/exports/(?P<name>{EXPORT_NAME_PATTERN})")
_RESTRICTED_NAME = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"  # RFC 6838, a type's or a subtype's
_CONTENT_TYPE = re.compile(rf"{_RESTRICTED_NAME}/{_RESTRICTED_NAME}")
# Path separators (a name is never a path) and control characters (a CR or LF is a new header)
_NOT_IN_FILENAME = re.compile("[/\\\\\x00-\x1f\x7f\x85\u2028\u2029]")
_HTTP_URL: TypeAdapter[AnyHttpUrl] = TypeAdapter(AnyHttpUrl)
# The standard library's own table, not the host's /etc/mime.types: the same guess everywhere
_TYPES = mimetypes.MimeTypes()
# A compressed file's type, when the name says it is one (report.csv.gz is not text/csv)
_COMPRESSED = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz"}
# RFC 2231 attribute-char besides letters and digits: left as they are in an encoded name
_ATTRIBUTE_CHARS = "!#$&+-.^_`|~"
_SEGMENT_CHARS = 60  # of an encoded file name per RFC 2231 continuation


def guess_content_type(filename: str) -> str:
    """The content type a file name suggests; application/octet-stream when it says none."""
    guessed, encoding = _TYPES.guess_type(filename, strict=False)
    if encoding is not None:
        return _COMPRESSED.get(encoding, "application/octet-stream")
    return guessed or "application/octet-stream"


class Attachment(BaseModel):
    """One attached file: its name, its content type, and its bytes in base64 or where the
    worker gets them (an http(s) URL, or `/exports/<name>` as POST /jobs/export answers)."""

    model_config = ConfigDict(extra="forbid")

    filename: str = Field(min_length=1, max_length=MAX_FILENAME_CHARS)
    content_type: str | None = Field(
        None, max_length=255, description="type/subtype; default: from the file name"
    )
    content_base64: str | None = None
    url: str | None = Field(None, max_length=MAX_URL_LENGTH)

    @field_validator("filename")
    @classmethod
    def _a_name_not_a_path(cls, filename: str) -> str:
        if _NOT_IN_FILENAME.search(filename) or filename in (".", ".."):
            raise ValueError("a file name, without '/', '\\', CR, LF or control characters")
        return filename

    @field_validator("content_type")
    @classmethod
    def _type_slash_subtype(cls, content_type: str | None) -> str | None:
        if content_type is None:
            return None
        lowered = content_type.lower()
        if not _CONTENT_TYPE.fullmatch(lowered):
            raise ValueError("a content type is type/subtype, such as application/pdf")
        if lowered.startswith(("multipart/", "message/")):
            raise ValueError(f"{lowered} cannot be attached as a file: use a single-part type")
        return lowered

    @field_validator("content_base64")
    @classmethod
    def _base64_within_the_cap(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        compact = "".join(value.split())  # line breaks every 76 characters are common
        try:
            size = len(base64.b64decode(compact, validate=True))
        except (binascii.Error, ValueError):
            raise ValueError("not valid base64") from None
        limit = _context(info).get("max_attachment_bytes", DEFAULT_MAX_BYTES)
        if size > limit:
            raise ValueError(
                f"{size} bytes is more than {limit} for one attachment (MAIL_MAX_ATTACHMENT_BYTES)"
            )
        return compact

    @field_validator("url")
    @classmethod
    def _fetchable(cls, url: str | None, info: ValidationInfo) -> str | None:
        if url is None or url.startswith("/"):
            if url is not None and not _EXPORT_URL.fullmatch(url):
                raise ValueError("a path must be an export's: /exports/<name> (POST /jobs/export)")
            return url
        try:
            checked = str(_HTTP_URL.validate_python(url))
        except ValidationError:
            raise ValueError("an http(s) URL, or an export's /exports/<name>") from None
        context = _context(info)
        try:  # the guard's checks that need no DNS; the worker's resolver does the rest
            check_url(
                URL(checked),
                context.get("scrape_allowed_cidrs", ()),
                context.get("scrape_allowed_ports", DEFAULT_PORTS),
            )
        except ForbiddenTargetError as exc:
            raise ValueError(f"not fetched: {exc}") from None
        return checked

    @model_validator(mode="after")
    def _one_source_and_a_type(self) -> Attachment:
        if (self.content_base64 is None) == (self.url is None):
            raise ValueError("give exactly one of 'content_base64' or 'url'")
        self.content_type = self.content_type or guess_content_type(self.filename)
        return self

    def inline_bytes(self) -> bytes | None:
        return None if self.content_base64 is None else base64.b64decode(self.content_base64)

    def media_type(self) -> tuple[str, str]:
        content_type = self.content_type or guess_content_type(self.filename)
        maintype, _, subtype = content_type.partition("/")
        return maintype, subtype


def with_parent_export(email: dict[str, Any], job_id: str, previous: Any) -> dict[str, Any]:
    """An email that follows an export (`then`: its id is the export's with THEN_SUFFIX) with
    the export's file attached, by the name its result gives (`/exports/<name>`, read by
    `_read_export`), after the attachments it has; any other parent's result (`previous`) is
    ignored, and so is a file already attached."""
    name = previous.get("name") if isinstance(previous, dict) else None
    if not isinstance(name, str) or not _EXPORT_URL.fullmatch("/exports/" + name):
        return email
    if name.partition(".")[0] + THEN_SUFFIX != job_id:  # only the export it follows
        return email
    url = "/exports/" + name
    attachments = list(email.get("attachments") or [])
    if any(isinstance(a, dict) and a.get("url") == url for a in attachments):
        return email
    return email | {"attachments": [*attachments, {"filename": name, "url": url}]}


def _context(info: ValidationInfo) -> dict[str, Any]:
    return info.context or {}


def check_total(attachments: Sequence[Attachment], info: ValidationInfo) -> None:
    """The inline attachments together within the message's cap (URLs: see load_attachments)."""
    total = sum(len(a.inline_bytes() or b"") for a in attachments)
    limit = _context(info).get("max_total_attachment_bytes", DEFAULT_MAX_TOTAL_BYTES)
    if total > limit:
        raise ValueError(
            f"{total} bytes of attachments is more than {limit} (MAIL_MAX_TOTAL_ATTACHMENT_BYTES)"
        )


async def load_attachments(ctx: WorkerContext, attachments: Sequence[Attachment]) -> list[bytes]:
    """Every attachment's bytes, in order, for a try of the email job: inline ones decoded,
    URLs fetched and exports read within what is left of the caps. A URL that fails for a
    while (5xx, timeout) raises TransientJobError (the job is tried again); one refused for
    good (4xx, too large, the guard) PermanentJobError; both name the attachment."""
    settings = ctx.settings
    bodies = [a.inline_bytes() for a in attachments]
    left = settings.mail_max_total_attachment_bytes - sum(len(b or b"") for b in bodies)
    loaded = []
    for attachment, body in zip(attachments, bodies, strict=True):
        if body is None:
            limit = max(0, min(settings.mail_max_attachment_bytes, left))
            try:
                body = await _fetch(ctx, attachment.url or "", limit)
            except JobError as exc:
                raise _about(attachment, exc) from exc
            left -= len(body)
        loaded.append(body)
    return loaded


async def _fetch(ctx: WorkerContext, url: str, limit: int) -> bytes:
    export = _EXPORT_URL.fullmatch(url)
    if export is not None:
        return await _read_export(ctx, export["name"], limit)
    return await ctx.fetcher.fetch_bytes(url, limit, ctx.waiter)


async def _read_export(ctx: WorkerContext, name: str, limit: int) -> bytes:
    """An export's file; one not written yet while its job is still queued or running is
    worth another try, one gone (expired, failed, never asked for) is not."""
    export_id = name.partition(".")[0]
    pending = await ctx.redis.exists(job_key_prefix + export_id)  # before the file: see below
    path = ctx.settings.exports_dir / name
    try:  # a job that ends after the check above has renamed its file into place by now
        size = (await asyncio.to_thread(path.stat)).st_size
    except FileNotFoundError:
        if pending:
            raise TransientJobError(f"export {name} is not finished yet") from None
        raise PermanentJobError(f"no export {name}: expired, failed or never requested") from None
    if size > limit:
        raise PermanentJobError(f"file is larger than the {limit} byte limit")
    return await asyncio.to_thread(path.read_bytes)


def _about(attachment: Attachment, exc: JobError) -> JobError:
    """The same kind of error, saying which attachment it is about."""
    message = f"attachment {attachment.filename!r} ({attachment.url}): {exc}"
    if isinstance(exc, TransientJobError):
        return TransientJobError(message, exc.retry_after)
    return PermanentJobError(message)


def content_disposition(filename: str) -> str:
    """`attachment` with the file name: quoted when ASCII, else RFC 2231 (UTF-8, percent
    encoded, in continuations `filename*0*`, `filename*1*`... so that every line folds short),
    cut between characters, since some readers decode each segment by itself."""
    if filename.isascii():
        quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
        return f'attachment; filename="{quoted}"'
    segments = [""]
    for char in filename:
        encoded = quote(char, safe=_ATTRIBUTE_CHARS)
        if segments[-1] and len(segments[-1]) + len(encoded) > _SEGMENT_CHARS:
            segments.append("")
        segments[-1] += encoded
    if len(segments) == 1:
        return f"attachment; filename*=utf-8''{segments[0]}"
    segments[0] = "utf-8''" + segments[0]  # the charset, once, in the first segment
    parts = [f"filename*{n}*={segment}" for n, segment in enumerate(segments)]
    return "attachment; " + "; ".join(parts)


def mime_part(attachment: Attachment, body: bytes) -> Message:
    """The attachment as a compat32 part: base64 in 76-character lines."""
    part = Message()
    part["Content-Type"] = "/".join(attachment.media_type())
    part["Content-Transfer-Encoding"] = "base64"
    part["Content-Disposition"] = content_disposition(attachment.filename)
    part.set_payload(base64.encodebytes(body).decode("ascii"))
    return part


def add_to(message: EmailMessage, attachment: Attachment, body: bytes) -> None:
    """The attachment added to a message of the modern email package (SMTPUTF8 addresses),
    which writes the file name's RFC 2231 form itself."""
    maintype, subtype = attachment.media_type()
    message.add_attachment(body, maintype=maintype, subtype=subtype, filename=attachment.filename)
