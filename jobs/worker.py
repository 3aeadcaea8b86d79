"""Worker wiring: the shared clients each job uses, and the options an arq Worker is built with."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC
from typing import Any, cast

from arq.cron import CronJob, cron
from arq.typing import WorkerCoroutine

from asyncjobs import speedups
from asyncjobs.context import HTTP, REDIS, SETTINGS
from asyncjobs.redis import AutoPipelinedRedis, eviction_policy_warning, redis_settings
from asyncjobs.registry import load_job_modules
from asyncjobs.settings import Settings, get_settings
from asyncjobs.tracing import setup_tracing
from jobs.context import CPU, FETCHER, HTTP_JOBS, MONITOR, SEND_RATE, SMTP, WAKE_LISTENER
from jobs.cpulimit import CpuPool
from jobs.engine.monitor import JobMonitor
from jobs.engine.worker import WakeListener, worker_redis
from jobs.housekeeping import daily_cleanup, daily_report
from jobs.http.session import make_http_jobs_session
from jobs.mail.sendrate import SendRate
from jobs.mail.smtp import SmtpPool
from jobs.mail.smtpconfig import SmtpProblems
from jobs.registered import arq_functions, context_clients
from jobs.retry import ENGINE_TIMEOUT_GRACE_S
from jobs.schedules import run_schedules
from jobs.scrape import schedule_sources
from jobs.scrape.fetch import Fetcher, make_http_session

log = logging.getLogger(__name__)


async def startup(ctx: dict[str, Any]) -> None:
    """The worker's lifespan, first half: the clients all its jobs share (one HTTP session,
    one SMTP pool, one CPU pool, Redis), put in arq's ctx once under the keys the jobs' typed
    view reads (asyncjobs.context.JobContext, jobs.context.WorkerContext)."""
    settings: Settings = ctx.setdefault(SETTINGS, get_settings())
    # Before the HTTP sessions are made: the aiohttp client instrumentation applies to
    # sessions made after it (off unless OTEL_* variables configure it: asyncjobs.tracing).
    setup_tracing("asyncjobs-worker")
    # jobs' own commands share arq's pool, sent together when jobs send them together
    redis = AutoPipelinedRedis.sharing_pool_of(ctx[REDIS])
    http = make_http_session(settings)
    monitor = JobMonitor(redis, settings.keep_result)
    monitor.queue_name = settings.queue_name  # its depth is sampled for the dashboard's trends
    wake_listener = WakeListener(settings)
    ctx.update(
        {
            REDIS: redis,
            HTTP: http,
            FETCHER: Fetcher(http, settings, redis),
            HTTP_JOBS: make_http_jobs_session(settings),
            SMTP: SmtpPool(settings, SmtpProblems(redis)) if settings.smtp_host else None,
            CPU: CpuPool.from_settings(settings),
            SEND_RATE: (
                SendRate(redis, settings.smtp_max_per_second)
                if settings.smtp_max_per_second
                else None
            ),
            MONITOR: monitor,
            WAKE_LISTENER: wake_listener,
            **context_clients(redis, settings),
        }
    )
    monitor.start()
    wake_listener.start()
    if ctx[SMTP] is not None:  # a wrong password or CA: an ERROR line now, not at the first email
        ctx[SMTP].start_check()
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    log.info("worker started: event loop %s, speedups: %s", loop, speedups.describe())
    if warning := await eviction_policy_warning(redis):
        log.warning(warning)
    log.info(
        "worker ready: max_jobs=%d smtp=%s:%s",
        settings.worker_max_jobs,
        settings.smtp_host or "-",
        settings.smtp_port,
    )


async def shutdown(ctx: dict[str, Any]) -> None:
    """The lifespan's second half: each client closed, if start-up got as far as making it."""
    for key in (MONITOR, WAKE_LISTENER):
        if ctx.get(key):
            await ctx[key].stop()
    for key in (HTTP, HTTP_JOBS, SMTP, CPU):
        if ctx.get(key):
            await ctx[key].close()


def cron_jobs(settings: Settings) -> list[CronJob]:
    """Scheduled work. `unique` (arq's default) runs each tick once however many workers run."""
    tick = settings.scheduler_tick_seconds
    return [
        cron(
            cast(WorkerCoroutine, schedule_sources),
            second=set(range(0, 60, tick)) if tick < 60 else 0,
            run_at_startup=True,
        ),
        cron(
            cast(WorkerCoroutine, run_schedules),
            second=set(range(0, 60, tick)) if tick < 60 else 0,
            run_at_startup=True,
        ),
        cron(
            cast(WorkerCoroutine, daily_cleanup),
            hour=settings.cleanup_hour,
            minute=0,
            second=0,
        ),
        cron(
            cast(WorkerCoroutine, daily_report),
            hour=settings.report_hour,
            minute=0,
            second=0,
        ),
    ]


def worker_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for `arq.worker.Worker` (and the attributes of `WorkerSettings`):
    every registered job type, the built-ins and those of the modules JOB_MODULES names
    (JobRegistrationError, one line, if one cannot be loaded)."""
    load_job_modules(settings.job_modules)
    return {
        "functions": arq_functions(settings),
        "cron_jobs": cron_jobs(settings),
        "timezone": UTC,  # cron hours in settings are UTC
        "on_startup": startup,
        "on_shutdown": shutdown,
        "redis_settings": redis_settings(settings),  # read by `arq --check`
        "redis_pool": worker_redis(settings),
        "queue_name": settings.queue_name,
        "max_jobs": settings.worker_max_jobs,
        "job_timeout": settings.job_timeout + ENGINE_TIMEOUT_GRACE_S,  # the wrapper's fires first
        "keep_result": settings.keep_result,
        "health_check_interval": settings.worker_health_interval,
        "poll_delay": 0.1,
        "allow_abort_jobs": True,
        "job_completion_wait": settings.shutdown_grace,
        "ctx": {"settings": settings},  # the jobs' settings, and the engine's lease
    }
