"""One SMTP transaction with PIPELINING (RFC 2920): MAIL, every RCPT and DATA in one write, then
the message in a second one; two round trips per message instead of three plus one per recipient.

aiosmtplib (which still makes the connection: TLS, EHLO, AUTH) reads one reply per command it
writes and drops a reply that arrives early, so it cannot read a pipelined group's replies. For
the transaction, `send_pipelined` puts a small reply reader on the connection's transport
(asyncio's `set_protocol`) and gives the transport back to aiosmtplib afterwards. Errors are
aiosmtplib's own exception classes, so the pool classifies them as it classifies the rest.
"""

from __future__ import annotations

import asyncio
import re
from typing import cast

import aiosmtplib
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from asyncjobs.deadlines import deadline

MAX_REPLY_BYTES = 64 * 1024  # a reply longer than this is not from a sane server
# a CR or LF in an address would start a command of its own (addresses are validated before
# they get here; this keeps the rule next to the place that would be hurt)
_LINE_BREAK = re.compile(rb"[\r\n]")


class _ReplyReader(asyncio.Protocol):
    """Parses SMTP replies as they arrive and hands them out in order."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._replies: list[tuple[int, str]] = []
        self._lines: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._error: Exception | None = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > MAX_REPLY_BYTES:
            self._fail(aiosmtplib.SMTPResponseException(-1, "SMTP reply too long"))
            return
        while (end := self._buffer.find(b"\n")) != -1:
            line = bytes(self._buffer[: end + 1]).rstrip(b"\r\n")
            del self._buffer[: end + 1]
            self._lines.append(line)
            if line[3:4] == b"-":  # more lines of the same reply follow
                continue
            try:
                code = int(line[:3])
            except ValueError:
                self._fail(aiosmtplib.SMTPResponseException(-1, f"malformed reply: {line!r}"))
                return
            text = b"\n".join(part[4:] for part in self._lines).decode("utf-8", "replace")
            self._lines = []
            self._replies.append((code, text))
        self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("the SMTP server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected(f"SMTP connection lost: {exc or 'closed'}"))

    def _fail(self, error: Exception) -> None:
        self._error = self._error or error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def replies(self, n: int, timeout: float | None) -> list[tuple[int, str]]:
        """The next `n` replies, waiting at most `timeout` seconds for all of them."""
        try:
            async with deadline(timeout):
                while len(self._replies) < n:
                    if self._error is not None:
                        raise self._error
                    self._waiter = asyncio.get_running_loop().create_future()
                    await self._waiter
        except TimeoutError as exc:
            raise aiosmtplib.SMTPReadTimeoutError("timed out waiting for the SMTP server") from exc
        taken, self._replies = self._replies[:n], self._replies[n:]
        return taken


def envelope_commands(sender: str, recipients: list[str], size: int | None) -> bytes:
    """MAIL FROM, one RCPT TO per recipient, DATA: the group written at once."""
    mail = b"MAIL FROM:<" + sender.encode("ascii") + b">"
    if size is not None:
        mail += b" SIZE=%d" % size
    lines = [mail, *(b"RCPT TO:<" + r.encode("ascii") + b">" for r in recipients), b"DATA"]
    if any(_LINE_BREAK.search(line) for line in lines):
        raise ValueError("an SMTP address contains a line break")
    return b"\r\n".join(lines) + b"\r\n"


def data_payload(message: bytes) -> bytes:
    """The message as DATA carries it: CRLF lines, leading dots doubled, the final dot."""
    body = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message))
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


async def send_pipelined(
    client: aiosmtplib.SMTP, sender: str, recipients: list[str], message: bytes
) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    """Send one message on `client`'s connection, which must have said PIPELINING; returns what
    aiosmtplib's `sendmail` returns: (refused recipients, the final reply's text)."""
    payload = data_payload(message)
    size = len(payload) if client.supports_extension("size") else None
    commands = envelope_commands(sender, recipients, size)
    protocol = client.protocol
    transport = protocol.transport if protocol is not None else None
    if protocol is None or transport is None or transport.is_closing():
        raise aiosmtplib.SMTPServerDisconnected("SMTP connection lost")
    transport = cast(asyncio.WriteTransport, transport)  # uvloop's are not its subclasses
    reader = _ReplyReader()
    transport.set_protocol(reader)
    try:
        transport.write(commands)
        mail, *rcpts, data = await reader.replies(len(recipients) + 2, client.timeout)
        if mail[0] != 250:
            raise aiosmtplib.SMTPSenderRefused(mail[0], mail[1], sender)
        refused = {
            r: aiosmtplib.SMTPResponse(code, text)
            for r, (code, text) in zip(recipients, rcpts, strict=True)
            if not 200 <= code < 300
        }
        if data[0] == 354 and len(refused) == len(recipients):
            # a server that opens DATA with no recipient left: end it empty, send nothing
            transport.write(b".\r\n")
            await reader.replies(1, client.timeout)
        if len(refused) == len(recipients):
            raise aiosmtplib.SMTPRecipientsRefused(
                [aiosmtplib.SMTPRecipientRefused(v.code, v.message, r) for r, v in refused.items()]
            )
        if data[0] != 354:
            raise aiosmtplib.SMTPDataError(data[0], data[1])
        transport.write(payload)
        [(code, text)] = await reader.replies(1, client.timeout)
        if code != 250:
            raise aiosmtplib.SMTPDataError(code, text)
        return refused, text
    finally:
        if not transport.is_closing():
            transport.set_protocol(protocol)
