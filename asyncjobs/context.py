"""What a running job receives: `JobContext`, typed attributes instead of arq's `ctx` dict.

The worker builds one per try from the clients it shares between all its jobs (one HTTP
session, one Redis pool, the settings), so a job never opens its own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
from redis.asyncio import Redis

from asyncjobs.settings import Settings

# (job name, arguments, enqueue options) -> the new job's id; given by the worker
Enqueuer = Callable[[str, dict[str, Any], dict[str, Any]], Awaitable[str]]
# (done, total, step) -> None
ProgressWriter = Callable[[int, int | None, str], Awaitable[None]]


@dataclass(frozen=True)
class JobContext:
    """One try of one job.

    - `job_id`, `job_try` (1 on the first try), `enqueue_time`;
    - `settings`, `redis` (the worker's pool), `http` (the worker's shared aiohttp session:
      it does not go through the scraper's SSRF guard, so only call URLs your code chose);
    - `enqueue(...)` a follow-up job, `send_email(...)`, and `progress(...)` shown by
      `GET /jobs/{id}` and the dashboard."""

    job_id: str
    job_try: int
    enqueue_time: datetime | None
    settings: Settings
    redis: Redis
    http: aiohttp.ClientSession
    _enqueue: Enqueuer
    _progress: ProgressWriter

    async def enqueue(
        self,
        job: str | Callable[..., Any],
        /,
        *,
        delay_seconds: float | None = None,
        priority: str | None = None,
        job_id: str | None = None,
        **arguments: Any,
    ) -> str:
        """Enqueue a job (a registered name or a `@job` function) with keyword arguments,
        validated by its model first; the new job's id."""
        name = job if isinstance(job, str) else job.__name__
        options: dict[str, Any] = {}
        if delay_seconds:
            options["delay_seconds"] = delay_seconds
        if priority is not None:
            options["priority"] = priority
        if job_id is not None:
            options["job_id"] = job_id
        return await self._enqueue(name, arguments, options)

    async def send_email(
        self, *, to: list[str] | str, subject: str, text: str | None = None, **fields: Any
    ) -> str:
        """Enqueue an email (the fields `POST /jobs/email` takes); the email job's id."""
        recipients = [to] if isinstance(to, str) else to
        email = {"to": recipients, "subject": subject, **fields}
        if text is not None:
            email["text"] = text
        return await self._enqueue("send_email", {"email": email}, {})

    async def progress(self, done: int, total: int | None = None, step: str = "") -> None:
        """Record how far the job is (`done` of `total`, and what it does now)."""
        await self._progress(done, total, step)
