"""A small pool of SMTP connections shared by every email job running in one worker."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email._policybase import Compat32
from email.generator import BytesGenerator
from email.header import Header
from email.message import EmailMessage, Message
from email.utils import parseaddr

import aiosmtplib

from asyncjobs.errors import JobError, PermanentJobError, TransientJobError
from asyncjobs.settings import Settings
from jobs.mail.pipelining import send_pipelined

log = logging.getLogger(__name__)

# An idle connection older than this is checked with NOOP before reuse: servers drop idle clients.
STALE_AFTER_S = 5.0


class _ShortLinesAsIs(Compat32):
    """compat32 for SMTP (CRLF), writing a short ASCII header line as it is. compat32 runs every
    header through email.header.Header to fold it, which cost more than half of flattening a
    message, and gives back the same line whenever the line fits."""

    def _fold(self, name: str, value: str | Header, sanitize: bool) -> str:
        if (
            isinstance(value, str)
            and value.isascii()
            and "\n" not in value
            and "\r" not in value
            and self.max_line_length is not None
            and len(name) + len(value) + 2 <= self.max_line_length
        ):
            return f"{name}: {value}{self.linesep}"
        folded: str = super()._fold(name, value, sanitize)  # type: ignore[misc]
        return folded


SMTP_COMPAT32 = _ShortLinesAsIs(linesep="\r\n")


def envelope_sender(message: Message) -> str:
    """The address of the From header (a bare address: see build_message)."""
    return parseaddr(str(message["From"]))[1]


def message_bytes(message: Message) -> bytes:
    """A compat32 message as sent over SMTP (aiosmtplib's own flattening is not this cheap)."""
    out = io.BytesIO()
    BytesGenerator(out, policy=SMTP_COMPAT32).flatten(message)
    return out.getvalue()


@dataclass
class SendOutcome:
    accepted: list[str]
    refused: dict[str, str] = field(default_factory=dict)
    response: str = ""


@dataclass
class _Idle:
    client: aiosmtplib.SMTP
    since: float


class SmtpPool:
    """At most `smtp_max_connections` connections, reused across jobs, each call bounded in time."""

    def __init__(self, settings: Settings) -> None:
        if not settings.smtp_host:
            raise ValueError("SMTP_HOST is not set")
        self._settings = settings
        if not settings.smtp_tls_verify:
            log.warning(
                "SMTP_TLS_VERIFY=false: the certificate of %s is not checked; anyone on the "
                "path can read and change the mail (set SMTP_TLS_CA_FILE for a private CA)",
                settings.smtp_host,
            )
        self._slots = asyncio.Semaphore(settings.smtp_max_connections)
        self._idle: list[_Idle] = []

    async def send(
        self,
        message: Message,
        recipients: list[str],
        on_accepted: Callable[[SendOutcome], Awaitable[None]] | None = None,
    ) -> SendOutcome:
        """Send one message. `on_accepted` (the sent marker) runs as soon as the server has
        accepted it and before its connection carries anything else, so a crash can leave at
        most one accepted-but-unmarked message per connection: the one in its final reply."""
        async with self._slots:
            client = await self._acquire()
            try:
                if isinstance(message, EmailMessage):  # SMTPUTF8 addresses: see build_message
                    errors, response = await client.send_message(message, recipients=recipients)
                elif client.supports_extension("pipelining"):
                    errors, response = await send_pipelined(
                        client, envelope_sender(message), recipients, message_bytes(message)
                    )
                else:
                    data = message_bytes(message)
                    errors, response = await client.sendmail(message["From"], recipients, data)
                refused = {rcpt: f"{err.code} {err.message}" for rcpt, err in errors.items()}
                accepted = [rcpt for rcpt in recipients if rcpt not in refused]
                outcome = SendOutcome(accepted=accepted, refused=refused, response=response)
                if on_accepted is not None:
                    await on_accepted(outcome)
            except aiosmtplib.SMTPException as exc:
                self._discard(client)
                raise classify_smtp_error(exc) from exc
            except OSError as exc:
                self._discard(client)
                raise TransientJobError(f"SMTP connection failed: {exc}") from exc
            except BaseException:  # cancelled (abort, shutdown): never reuse a half-used session
                self._discard(client)
                raise
            self._idle.append(_Idle(client, time.monotonic()))
        return outcome

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for entry in idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(entry.client.quit(), timeout=2)
            entry.client.close()

    async def _acquire(self) -> aiosmtplib.SMTP:
        while self._idle:
            entry = self._idle.pop()
            if await self._still_usable(entry):
                return entry.client
            self._discard(entry.client)
        return await self._connect()

    async def _still_usable(self, entry: _Idle) -> bool:
        if not entry.client.is_connected:
            return False
        if time.monotonic() - entry.since < STALE_AFTER_S:
            return True
        try:
            await entry.client.noop()
        except (aiosmtplib.SMTPException, OSError):
            return False
        return True

    async def _connect(self) -> aiosmtplib.SMTP:
        s = self._settings
        client = aiosmtplib.SMTP(
            hostname=s.smtp_host,
            port=s.smtp_port,
            username=s.smtp_username,
            password=s.smtp_password.get_secret_value() if s.smtp_password else None,
            use_tls=s.smtp_use_tls,
            start_tls=s.smtp_start_tls,
            validate_certs=s.smtp_tls_verify,
            cert_bundle=str(s.smtp_tls_ca_file) if s.smtp_tls_ca_file else None,
            timeout=s.smtp_timeout,
        )
        try:
            await client.connect()
        except aiosmtplib.SMTPException as exc:
            raise classify_smtp_error(exc) from exc
        except OSError as exc:
            raise TransientJobError(f"could not connect to SMTP server: {exc}") from exc
        return client

    @staticmethod
    def _discard(client: aiosmtplib.SMTP) -> None:
        client.close()


def classify_smtp_error(exc: aiosmtplib.SMTPException) -> JobError:
    """SMTP 5xx and refused recipients are permanent; 4xx, timeouts and lost connections are not."""
    if isinstance(exc, aiosmtplib.SMTPConnectError | aiosmtplib.SMTPConnectTimeoutError):
        return TransientJobError(f"could not connect to the SMTP server: {exc}")
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        codes = [r.code for r in exc.recipients]
        detail = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
        kind = PermanentJobError if all(c >= 500 for c in codes) else TransientJobError
        return kind(f"all recipients refused: {detail}")
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code >= 500:
        return PermanentJobError(f"SMTP server refused the message: {exc.code} {exc.message}")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return TransientJobError(f"SMTP server deferred the message: {exc.code} {exc.message}")
    return TransientJobError(f"SMTP error: {type(exc).__name__}: {exc}")
