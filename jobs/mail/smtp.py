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

from asyncjobs import tracing
from asyncjobs.errors import JobError, PermanentJobError, TransientJobError
from asyncjobs.settings import Settings
from jobs.mail.intl import send_international
from jobs.mail.pipelining import send_pipelined
from jobs.mail.smtpconfig import SmtpConfigError, SmtpProblems, config_problem

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


Reply = tuple[int, str]  # an SMTP reply: code, text
SMTPReply = aiosmtplib.SMTPResponseException


@dataclass
class SendOutcome:
    accepted: list[str]
    refused: dict[str, str] = field(default_factory=dict)  # recipient -> "code text"
    response: str = ""
    replies: dict[str, Reply] = field(default_factory=dict)  # the refused ones' replies


class ServerClosedConnection(TransientJobError):
    """The server closed the connection (a 421, or it was gone) before it took the message."""


@dataclass
class _Idle:
    client: aiosmtplib.SMTP
    since: float


class SmtpPool:
    """At most `smtp_max_connections` connections, reused across jobs, each call bounded in time."""

    def __init__(self, settings: Settings, problems: SmtpProblems | None = None) -> None:
        if not settings.smtp_host:
            raise ValueError("SMTP_HOST is not set")
        self._settings = settings
        # configuration failures: told once a minute, and to /health when given Redis
        self._problems = problems or SmtpProblems(None)
        self._check: asyncio.Task[bool] | None = None
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
        most one accepted-but-unmarked message per connection: the one in its final reply.

        A reused connection that the server has closed (a 421 after its N messages per
        connection, an idle connection it dropped) fails the message before anything accepts
        it: it is sent again at once on a new connection, which is what a retry would do, a
        minute later and a try spent. Once, and only from a reused connection: a new one that
        fails is the server's answer."""
        settings = self._settings
        with tracing.client_span(
            "smtp send",
            **{
                "server.address": settings.smtp_host or "",
                "server.port": settings.smtp_port,
                "asyncjobs.mail.recipients": len(recipients),
            },
        ):
            async with self._slots:
                client, reused = await self._acquire()
                try:
                    outcome = await self._transaction(client, message, recipients, on_accepted)
                except ServerClosedConnection as exc:
                    if not reused:
                        raise
                    log.info("%s (a pooled connection): sending again on a new one", exc)
                    client = await self._connect()
                    outcome = await self._transaction(client, message, recipients, on_accepted)
                self._idle.append(_Idle(client, time.monotonic()))
        await self._problems.succeeded()
        return outcome

    async def _transaction(
        self,
        client: aiosmtplib.SMTP,
        message: Message,
        recipients: list[str],
        on_accepted: Callable[[SendOutcome], Awaitable[None]] | None,
    ) -> SendOutcome:
        """One message on `client`; on any failure the client is closed, never reused."""
        try:
            errors, response = await _deliver(client, message, recipients)
        except (aiosmtplib.SMTPException, OSError) as exc:
            self._discard(client)
            raise await self._failure(exc, "SMTP connection failed") from exc
        except BaseException:  # cancelled (abort, shutdown): never reuse a half-used session
            self._discard(client)
            raise
        outcome = SendOutcome(
            accepted=[rcpt for rcpt in recipients if rcpt not in errors],
            refused={rcpt: f"{err.code} {err.message}" for rcpt, err in errors.items()},
            response=response,
            replies={rcpt: (err.code, err.message) for rcpt, err in errors.items()},
        )
        if on_accepted is not None:
            try:  # outside the SMTP part: an error here is Redis's, never a reason to resend
                await on_accepted(outcome)
            except OSError as exc:
                self._discard(client)
                raise TransientJobError(f"could not record the sent message: {exc}") from exc
            except BaseException:
                self._discard(client)
                raise
        return outcome

    async def _failure(
        self, exc: aiosmtplib.SMTPException | OSError, what: str, level: int = logging.WARNING
    ) -> JobError:
        """The job error for `exc`. A configuration failure is also told (at most once a
        minute, at `level`) and recorded for /health."""
        problem = config_problem(exc, self._settings)
        if problem is not None:
            await self._problems.failed(problem, level)
            return problem
        if closed_by_server(exc):
            said = f"{exc.code} {exc.message}" if isinstance(exc, SMTPReply) else str(exc)
            return ServerClosedConnection(f"the SMTP server closed the connection: {said}")
        if isinstance(exc, aiosmtplib.SMTPException):
            return classify_smtp_error(exc)
        return TransientJobError(f"{what}: {exc}")

    def start_check(self) -> None:
        """Run `check` in the background: the worker starts without waiting for it."""
        self._check = asyncio.create_task(self.check(), name="smtp-start-up-check")

    async def check(self) -> bool:
        """Connect as a send does (EHLO, STARTTLS, AUTH) and QUIT, sending nothing: whether
        that worked. A failure is logged at ERROR at once (a configuration failure is also
        recorded for /health); the worker runs on, and its emails wait and retry."""
        s = self._settings
        try:
            client = await self._connect(level=logging.ERROR)
        except SmtpConfigError:
            return False  # told at ERROR by SmtpProblems
        except JobError as exc:
            log.error("SMTP check at start-up failed: %s; emails wait and retry", exc)
            return False
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.quit(), timeout=2)
        client.close()
        await self._problems.succeeded()
        log.info("SMTP check at start-up passed: %s:%d", s.smtp_host, s.smtp_port)
        return True

    async def close(self) -> None:
        if self._check is not None:
            self._check.cancel()
            await asyncio.gather(self._check, return_exceptions=True)
        idle, self._idle = self._idle, []
        for entry in idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(entry.client.quit(), timeout=2)
            entry.client.close()

    async def _acquire(self) -> tuple[aiosmtplib.SMTP, bool]:
        """A connection, and whether it was used before (then the server may have closed it)."""
        while self._idle:
            entry = self._idle.pop()
            if await self._still_usable(entry):
                return entry.client, True
            self._discard(entry.client)
        return await self._connect(), False

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

    async def _connect(self, level: int = logging.WARNING) -> aiosmtplib.SMTP:
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
        except (aiosmtplib.SMTPException, OSError) as exc:
            error = await self._failure(exc, "could not connect to SMTP server", level)
            if isinstance(error, ServerClosedConnection):  # on a new connection: not a reuse
                error = TransientJobError(f"could not connect to SMTP server: {exc}")
            raise error from exc
        return client

    @staticmethod
    def _discard(client: aiosmtplib.SMTP) -> None:
        client.close()


async def _deliver(
    client: aiosmtplib.SMTP, message: Message, recipients: list[str]
) -> tuple[dict[str, aiosmtplib.SMTPResponse], str]:
    """The SMTP transaction: (refused recipients, the final reply's text)."""
    if isinstance(message, EmailMessage):  # SMTPUTF8 addresses: see build_message
        return await send_international(client, message, recipients)  # without SMTPUTF8 too
    if client.supports_extension("pipelining"):
        return await send_pipelined(
            client, envelope_sender(message), recipients, message_bytes(message)
        )
    return await client.sendmail(message["From"], recipients, message_bytes(message))


def closed_by_server(exc: BaseException) -> bool:
    """The server ended the session: it closed the connection, or said 421 (RFC 5321: it is
    closing the channel), without saying it took the message. A timeout is not this: a slow
    server may still be working on it, and a resend at once would double the wait."""
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return exc.code == 421
    if isinstance(exc, aiosmtplib.SMTPConnectError):
        return False  # never connected: not a closed connection
    return isinstance(exc, aiosmtplib.SMTPServerDisconnected | ConnectionError)


def refused_replies(error: BaseException) -> dict[str, Reply]:
    """Each recipient's reply when `error` is a message every RCPT TO refused (some 4xx, some
    5xx perhaps); empty for any other error."""
    cause = error.__cause__
    if isinstance(cause, aiosmtplib.SMTPRecipientsRefused):
        return {r.recipient: (r.code, r.message) for r in cause.recipients}
    return {}


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
