"""A local SMTP sink (aiosmtpd) that stores every message as an .eml file, for development.

Used by `python -m app dev` when no SMTP_HOST is configured; the API lists the folder at /dev/mail.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser, BytesParser
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session
from pydantic import BaseModel

MESSAGE_NAME_PATTERN = r"[0-9]{19}-[0-9a-f]{8}\.eml"
_MESSAGE_NAME = re.compile(MESSAGE_NAME_PATTERN)
MAX_MESSAGE_BYTES = 25 * 1024 * 1024


class MaildirHandler:
    """aiosmtpd handler: writes each message, with its envelope, to `<folder>/<ns>-<id>.eml`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        name = f"{time.time_ns():019d}-{uuid.uuid4().hex[:8]}.eml"
        envelope_lines = (
            f"X-Sink-Mail-From: {envelope.mail_from}\r\n"
            f"X-Sink-Rcpt-To: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode()
        content = envelope.original_content or b""
        await asyncio.to_thread(_write_atomically, self.folder / name, envelope_lines + content)
        return "250 Message accepted for delivery"


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


async def start_smtp_server(
    handler: Any, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None
) -> asyncio.Server:
    """Serve SMTP with `handler` inside the running event loop (no thread, unlike Controller);
    with `tls`, STARTTLS is offered (and required before MAIL)."""
    loop = asyncio.get_running_loop()

    def protocol() -> SMTP:
        return SMTP(
            handler,
            hostname="asyncjobs-sink",
            data_size_limit=MAX_MESSAGE_BYTES,
            tls_context=tls,
            require_starttls=tls is not None,
        )

    return await loop.create_server(protocol, host=host, port=port)


def server_port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


class MailSummary(BaseModel):
    name: str
    received_at: datetime
    mail_from: str | None
    rcpt_to: list[str]
    subject: str | None
    message_id: str | None
    size: int


async def list_messages(folder: Path, limit: int = 50) -> list[MailSummary]:
    return await asyncio.to_thread(_list_messages, folder, limit)


def _list_messages(folder: Path, limit: int) -> list[MailSummary]:
    if not folder.is_dir():
        return []
    names = sorted((p.name for p in folder.glob("*.eml")), reverse=True)[:limit]
    return [_summarize(folder / name) for name in names]


def _summarize(path: Path) -> MailSummary:
    with path.open("rb") as fh:
        headers = BytesHeaderParser(policy=policy.default).parse(fh)
    rcpts = str(headers.get("X-Sink-Rcpt-To", ""))
    return MailSummary(
        name=path.name,
        received_at=datetime.fromtimestamp(int(path.name.split("-")[0]) / 1e9, UTC),
        mail_from=headers.get("X-Sink-Mail-From"),
        rcpt_to=[r.strip() for r in rcpts.split(",") if r.strip()],
        subject=headers.get("Subject"),
        message_id=headers.get("Message-ID"),
        size=path.stat().st_size,
    )


async def read_message(folder: Path, name: str) -> bytes | None:
    if not _MESSAGE_NAME.fullmatch(name):
        return None
    path = folder / name
    return await asyncio.to_thread(path.read_bytes) if path.is_file() else None


# -- one message, opened as Mailpit shows it (the dashboard's /ui/mail/<name>) --

ENVELOPE_HEADERS = ("X-Sink-Mail-From", "X-Sink-Rcpt-To")  # the sink's own lines, shown apart


@dataclass(frozen=True)
class AttachmentInfo:
    index: int  # its place among the message's attachments: the download's address
    filename: str
    content_type: str
    size: int


@dataclass(frozen=True)
class OpenedMessage:
    headers: list[tuple[str, str]]  # as sent, decoded, in order; the envelope's apart
    mail_from: str
    rcpt_to: list[str]
    subject: str
    text: str | None
    html: str | None
    attachments: list[AttachmentInfo]


def _parse(raw: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)  # what policy.default builds
    return message


def _attachments(message: EmailMessage) -> list[EmailMessage]:
    """Parts a reader would save: marked attachment, or inline with a file name (an image)."""
    return [
        part
        for part in message.walk()
        if isinstance(part, EmailMessage)
        and not part.is_multipart()
        and (part.is_attachment() or part.get_filename() is not None)
    ]


def _body(message: EmailMessage, subtype: str) -> str | None:
    part = message.get_body(preferencelist=(subtype,))
    if part is None or part.is_attachment() or part.get_filename() is not None:
        return None
    content = part.get_content()
    return content if isinstance(content, str) else None


def _size(part: EmailMessage) -> int:
    payload = part.get_payload(decode=True)
    return len(payload) if isinstance(payload, bytes) else 0


def open_message(raw: bytes) -> OpenedMessage:
    message = _parse(raw)
    rcpts = str(message.get("X-Sink-Rcpt-To", ""))
    return OpenedMessage(
        headers=[(k, str(v)) for k, v in message.items() if k not in ENVELOPE_HEADERS],
        mail_from=str(message.get("X-Sink-Mail-From", "")),
        rcpt_to=[r.strip() for r in rcpts.split(",") if r.strip()],
        subject=str(message.get("Subject", "")),
        text=_body(message, "plain"),
        html=_body(message, "html"),
        attachments=[
            AttachmentInfo(
                index=i,
                filename=part.get_filename() or f"attachment-{i + 1}",
                content_type=part.get_content_type(),
                size=_size(part),
            )
            for i, part in enumerate(_attachments(message))
        ],
    )


def attachment(raw: bytes, index: int) -> tuple[AttachmentInfo, bytes] | None:
    """The message's attachment number `index` and its bytes, or None."""
    parts = _attachments(_parse(raw))
    if not 0 <= index < len(parts):
        return None
    part = parts[index]
    payload = part.get_payload(decode=True)
    data = payload if isinstance(payload, bytes) else b""
    filename = part.get_filename() or f"attachment-{index + 1}"
    return AttachmentInfo(index, filename, part.get_content_type(), len(data)), data
