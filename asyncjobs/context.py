"""What a running job receives: `JobContext`, typed attributes instead of arq's `ctx` dict.

arq hands every try a dict: the worker's shared clients (put there once by its start-up) and
the try's own fields. `JobContext` is a typed view of that dict, so job code reads
`ctx.redis`, not `ctx["redis"]`; the names of the dict's keys live here and in the worker's
start-up (jobs/worker.py) only. The built-ins get a view with the worker's other clients
(jobs.context.WorkerContext); users' jobs get this one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any

import aiohttp
from arq.connections import ArqRedis

from asyncjobs.registry import JOB_NAME_ATTRIBUTE
from asyncjobs.settings import Settings

# (job name, arguments, enqueue options) -> the new job's id
Enqueuer = Callable[[str, dict[str, Any], dict[str, Any]], Awaitable[str]]
# (job id, done, total, step) -> None
ProgressWriter = Callable[[str, int, int | None, str], Awaitable[None]]

# The keys of arq's ctx dict that the worker's start-up fills (the rest are arq's own).
SETTINGS, REDIS, HTTP = "settings", "redis", "http"
ENQUEUER, PROGRESS = "asyncjobs_enqueue", "asyncjobs_progress"
OWNER = "owner"  # per try (the runner's): the API key id the job was enqueued for


class JobContext:
    """One try of one job.

    - `job_id`, `job_try` (1 on the first try), `enqueue_time`;
    - `settings`, `redis` (the worker's pool), `http` (the worker's shared aiohttp session:
      it does not go through the scraper's SSRF guard, so only call URLs your code chose);
    - `enqueue(...)` a follow-up job, `send_email(...)`, and `progress(...)` shown by
      `GET /jobs/{id}` and the dashboard."""

    __slots__ = ("_ctx",)

    def __init__(self, ctx: Mapping[str, Any]) -> None:
        self._ctx = ctx

    @property
    def job_id(self) -> str:
        job_id: str = self._ctx["job_id"]
        return job_id

    @property
    def job_try(self) -> int:
        job_try: int = self._ctx["job_try"]
        return job_try

    @property
    def enqueue_time(self) -> datetime | None:
        enqueue_time: datetime | None = self._ctx.get("enqueue_time")
        return enqueue_time

    @property
    def settings(self) -> Settings:
        settings: Settings = self._ctx[SETTINGS]
        return settings

    @property
    def redis(self) -> ArqRedis:
        """The worker's Redis client (arq's, a redis-py `Redis`)."""
        redis: ArqRedis = self._ctx[REDIS]
        return redis

    @property
    def http(self) -> aiohttp.ClientSession:
        http: aiohttp.ClientSession = self._ctx[HTTP]
        return http

    async def enqueue(
        self,
        job: str | Callable[..., Any],
        /,
        *,
        delay_seconds: float | None = None,
        priority: str | None = None,
        job_id: str | None = None,
        unique_key: str | None = None,
        unique_window_seconds: float | None = None,
        **arguments: Any,
    ) -> str:
        """Enqueue a job (a registered name or a `@job` function) with keyword arguments,
        validated by its model first; the new job's id (with `job_id` of a job that exists,
        that job's: nothing is enqueued twice). With `unique_key`, while a job of that type
        enqueued with the same key for the same API key as this job is still queued,
        deferred, running or waiting for a retry (within `unique_window_seconds`, default an
        hour), that job's id, and nothing enqueued."""
        name = job if isinstance(job, str) else getattr(job, JOB_NAME_ATTRIBUTE, job.__name__)
        options: dict[str, Any] = {}
        if delay_seconds:
            options["delay_seconds"] = delay_seconds
        if priority is not None:
            options["priority"] = priority
        if job_id is not None:
            options["job_id"] = job_id
        if unique_key is not None:
            options["unique_key"] = unique_key
            options["unique_scope"] = str(self._ctx.get(OWNER) or "")  # this job's owner's
            if unique_window_seconds is not None:
                options["unique_window_seconds"] = unique_window_seconds
        elif unique_window_seconds is not None:
            raise ValueError("unique_window_seconds goes with a unique_key")
        enqueuer: Enqueuer = self._ctx[ENQUEUER]
        return await enqueuer(name, arguments, options)

    async def send_email(
        self, *, to: list[str] | str, subject: str, text: str | None = None, **fields: Any
    ) -> str:
        """Enqueue an email (the fields `POST /jobs/email` takes); the email job's id."""
        recipients = [to] if isinstance(to, str) else to
        email = {"to": recipients, "subject": subject, **fields}
        if text is not None:
            email["text"] = text
        return await self.enqueue("send_email", email=email)

    async def progress(self, done: int, total: int | None = None, step: str = "") -> None:
        """Record how far the job is (`done` of `total`, and what it does now)."""
        writer: ProgressWriter = self._ctx[PROGRESS]
        await writer(self.job_id, done, total, step)
