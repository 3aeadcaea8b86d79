"""SMTP configuration failures: a wrong password, a certificate the worker cannot verify, a
sender the server will not take from this account.

They are not the message's fault and go away once an operator fixes the configuration, so
every message waits and retries (as Postfix defers its queue on a 535) instead of going to the
dead-letter store. But they must not be quiet: the job's error names the setting to check, the
worker's log says it at most once a minute per problem (every email fails alike, and a line
per try would bury it), and `/health` is degraded with the reason until a send works.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import parseaddr

import aiosmtplib
from pydantic import BaseModel
from redis.asyncio import Redis
from redis.exceptions import RedisError

from asyncjobs.errors import TransientJobError
from asyncjobs.keys import SMTP_PROBLEM_KEY
from asyncjobs.settings import Settings
from jobs.values import as_text

log = logging.getLogger(__name__)

TELL_EVERY_S = 60.0  # one log line per problem per this many seconds, at most
REFRESH_EVERY_S = 30.0  # how often a worker that keeps failing rewrites the record
PROBLEM_TTL_S = 24 * 3600  # a record no worker refreshes (they all stopped) ends after this


class SmtpConfigError(TransientJobError):
    """A configuration failure: retried like a 4xx, told once a minute rather than per try."""

    warn_each_try = False

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "auth", "tls" or "sender": one problem, one log line a minute


def config_problem(exc: BaseException, settings: Settings) -> SmtpConfigError | None:
    """The configuration failure `exc` shows, or None when it is about the message or the
    network (those are classified by jobs.mail.smtp.classify_smtp_error)."""
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return SmtpConfigError(
            "auth",
            f"SMTP authentication failed ({exc.code} {exc.message}): "
            "check SMTP_USERNAME/SMTP_PASSWORD",
        )
    if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code == 530:
        return SmtpConfigError(
            "auth",
            f"the SMTP server requires authentication ({exc.code} {exc.message}): "
            "set SMTP_USERNAME/SMTP_PASSWORD",
        )
    if type(exc) is aiosmtplib.SMTPException and "AUTH extension" in str(exc):
        return SmtpConfigError(
            "auth", f"SMTP authentication impossible: {exc} (SMTP_USERNAME is set)"
        )
    if _refuses_our_sender(exc, settings):
        assert isinstance(exc, aiosmtplib.SMTPSenderRefused)
        return SmtpConfigError(
            "sender",
            f"the SMTP server refused the sender {exc.sender} ({exc.code} {exc.message}): "
            "check MAIL_FROM and what the SMTP account may send as",
        )
    if (failure := _certificate_failure(exc)) is not None:
        return SmtpConfigError(
            "tls",
            f"TLS certificate verification of {settings.smtp_host} failed ({failure}): "
            "set SMTP_TLS_CA_FILE to the CA that signed it, or fix the server's certificate",
        )
    return None


def _refuses_our_sender(exc: BaseException, settings: Settings) -> bool:
    """A 5xx to MAIL FROM for MAIL_FROM itself: the account may not send as it. (A caller's
    own `from` refused is about that message, and stays permanent.)"""
    return (
        isinstance(exc, aiosmtplib.SMTPSenderRefused)
        and exc.code >= 500
        and parseaddr(exc.sender)[1].lower() == parseaddr(settings.mail_from)[1].lower()
    )


def _certificate_failure(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error in `exc`'s chain (aiosmtplib raises it as it is, or
    wrapped), if there is one."""
    seen: BaseException | None = exc
    for _ in range(5):  # a short chain; never loop on a cycle
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class SmtpProblem(BaseModel):
    """What `/health` shows while the worker's SMTP configuration fails."""

    reason: str
    since: datetime


class SmtpProblems:
    """One worker's account of configuration failures: told in the log at most once a minute
    per problem, and recorded in Redis (SMTP_PROBLEM_KEY) for `/health` until a send works."""

    def __init__(self, redis: Redis | None, clock: Callable[[], float] = time.monotonic) -> None:
        self._redis = redis
        self._clock = clock  # a test's own, to cross a minute without waiting one
        self._told: dict[str, float] = {}  # problem kind -> when it was last logged (monotonic)
        self._untold: dict[str, int] = {}  # failures since, not logged
        self._recorded: tuple[str, float] | None = None  # reason written, when (monotonic)
        # an earlier run may have left a record: the first send that works clears it
        self._may_be_recorded = redis is not None

    async def failed(self, problem: SmtpConfigError, level: int = logging.WARNING) -> None:
        self._tell(problem, level)
        await self._record(problem)

    async def succeeded(self) -> None:
        """A send (or the start-up check) worked: the problem is over. Free when there is
        nothing to clear, which is every send but the first after a failure."""
        if not self._may_be_recorded or self._redis is None:
            return
        try:
            await self._redis.delete(SMTP_PROBLEM_KEY)
        except RedisError as exc:  # the next success tries again
            log.debug("could not clear the SMTP problem record: %r", exc)
            return
        self._may_be_recorded, self._recorded = False, None
        self._told.clear()
        self._untold.clear()

    def _tell(self, problem: SmtpConfigError, level: int) -> None:
        """One line per problem a minute; an ERROR (the start-up check's, once) always."""
        now = self._clock()
        last = self._told.get(problem.kind)
        if level < logging.ERROR and last is not None and now - last < TELL_EVERY_S:
            self._untold[problem.kind] = self._untold.get(problem.kind, 0) + 1
            return
        self._told[problem.kind] = now
        untold = self._untold.pop(problem.kind, 0)
        also = f" ({untold} more failures like it since the last line)" if untold else ""
        log.log(level, "SMTP configuration problem: %s; emails wait and retry%s", problem, also)

    async def _record(self, problem: SmtpConfigError) -> None:
        if self._redis is None:
            return
        reason, now = str(problem), self._clock()
        written = self._recorded
        if written and written[0] == reason and now - written[1] < REFRESH_EVERY_S:
            return  # a round trip per failing email would add load to a broken worker
        since = datetime.now(UTC).isoformat()
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hsetnx(SMTP_PROBLEM_KEY, "since", since)
                pipe.hset(SMTP_PROBLEM_KEY, "reason", reason)
                pipe.expire(SMTP_PROBLEM_KEY, PROBLEM_TTL_S)
                await pipe.execute()
        except RedisError as exc:  # the job's error and the log line still say it
            log.debug("could not record the SMTP problem: %r", exc)
            return
        self._recorded, self._may_be_recorded = (reason, now), True


def parse_problem(raw: dict[bytes, bytes] | dict[str, str]) -> SmtpProblem | None:
    """The SMTP_PROBLEM_KEY hash as read (HGETALL), or None when there is none."""
    fields = {as_text(k): as_text(v) for k, v in raw.items()}
    if "reason" not in fields:
        return None
    since = fields.get("since") or datetime.now(UTC).isoformat()
    return SmtpProblem(reason=fields["reason"], since=datetime.fromisoformat(since))
