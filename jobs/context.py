"""The built-ins' view of a try: `asyncjobs.JobContext` plus the worker's other shared clients
(the scraper's fetcher, the SMTP pool, the CPU pool, the send rate, the monitor), each typed.
The worker's start-up (jobs/worker.py) puts them in arq's ctx dict under these keys once."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp

# OWNER, per try: the API key the job was enqueued for (jobs.engine.queue.OWNER_KWARG)
from asyncjobs.context import OWNER as OWNER
from asyncjobs.context import JobContext
from jobs.engine.monitor import JobMonitor

if TYPE_CHECKING:  # the families import the retry wrapper, which imports this module
    from jobs.cpulimit import CpuPool
    from jobs.mail.sendrate import SendRate
    from jobs.mail.smtp import SmtpPool
    from jobs.scrape.fetch import Fetcher

T = TypeVar("T")

FETCHER, SMTP, CPU, SEND_RATE, MONITOR, WAKE_LISTENER = (
    "fetcher", "smtp", "cpu", "send_rate", "monitor", "wake_listener"
)  # fmt: skip
HTTP_JOBS = "http_jobs"  # the HTTP jobs' session: their own guard allowlist and pool


class WorkerContext(JobContext):
    __slots__ = ()

    @classmethod
    def of(cls, ctx: dict[str, Any] | WorkerContext) -> WorkerContext:
        """The view of arq's ctx dict (a view given is taken as it is)."""
        return ctx if isinstance(ctx, WorkerContext) else cls(ctx)

    @property
    def fetcher(self) -> Fetcher:
        fetcher: Fetcher = self._ctx[FETCHER]
        return fetcher

    @property
    def http_jobs(self) -> aiohttp.ClientSession:
        """The session HTTP jobs call through (jobs/http/session.py)."""
        session: aiohttp.ClientSession = self._ctx[HTTP_JOBS]
        return session

    @property
    def smtp(self) -> SmtpPool:
        """The SMTP pool; a worker without SMTP_HOST has none (KeyError: a misconfiguration
        the email job reports)."""
        smtp: SmtpPool | None = self._ctx.get(SMTP)
        if smtp is None:
            raise LookupError("this worker has no SMTP server (SMTP_HOST is not set)")
        return smtp

    @property
    def cpu(self) -> CpuPool:
        cpu: CpuPool = self._ctx[CPU]
        return cpu

    @property
    def owner(self) -> str:
        """The API key (its id) the job was enqueued for; "" when none was."""
        return str(self._ctx.get(OWNER) or "")

    async def run_cpu(self, what: str, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in the CPU pool, in this job's owner's turn (jobs.cpulimit)."""
        return await self.cpu.run(what, function, *args, owner=self.owner)

    @property
    def send_rate(self) -> SendRate | None:
        send_rate: SendRate | None = self._ctx.get(SEND_RATE)
        return send_rate

    @property
    def monitor(self) -> JobMonitor | None:
        monitor = self._ctx.get(MONITOR)
        return monitor if isinstance(monitor, JobMonitor) else None

    @property
    def waiter(self) -> str | None:
        """Whom the scraper's politeness books a host's turn for: this job, when it runs in a
        worker (None for a call outside one, which waits in place)."""
        waiter: str | None = self._ctx.get("job_id")
        return waiter

    @property
    def score(self) -> float | None:
        """This run's queue score (ms): when it became due."""
        score = self._ctx.get("score")
        return float(score) if score else None
