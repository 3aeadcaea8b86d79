"""The aiohttp application factory and the production web entry point."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from app.auth import KEYRING, KeyRing, rate_limit, require_api_key
from app.dashboard import setup_dashboard
from app.errors import json_errors
from app.httperrors import JsonErrorAppRunner
from app.routes import add_routes
from app.state import CPU, REDIS, SETTINGS
from asyncjobs.redis import connect
from asyncjobs.registry import load_job_modules
from asyncjobs.settings import Settings
from asyncjobs.tracing import setup_tracing
from jobs.cpulimit import CpuPool


def create_app(settings: Settings) -> web.Application:
    """The API, with a route for every job type registered, the modules JOB_MODULES names
    included (JobRegistrationError, one line, if one cannot be loaded)."""
    load_job_modules(settings.job_modules)
    # Before the app is made: the aiohttp server instrumentation applies to apps made after it.
    setup_tracing("asyncjobs-api")
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[json_errors, require_api_key, rate_limit],
    )
    app[SETTINGS] = settings
    app[KEYRING] = KeyRing(settings)
    app.cleanup_ctx.append(_redis_client)
    app.cleanup_ctx.append(_cpu_pool)
    add_routes(app, settings)
    setup_dashboard(app)  # the operator pages under /ui
    return app


async def _cpu_pool(app: web.Application) -> AsyncIterator[None]:
    # Its processes start at the first call that needs one (pebble starts them lazily).
    app[CPU] = CpuPool.from_settings(app[SETTINGS])
    yield
    await app[CPU].close()


async def _redis_client(app: web.Application) -> AsyncIterator[None]:
    # Connects lazily: the API starts (and answers 503) even while Redis is down.
    app[REDIS] = connect(app[SETTINGS])
    yield
    await app[REDIS].aclose(close_connection_pool=True)


def app_runner(settings: Settings, **kwargs: Any) -> web.AppRunner:
    """The app as it is served: idle keep-alive connections closed after a while, and the
    requests aiohttp's HTTP parser refuses answered in JSON too (app/httperrors.py)."""
    return JsonErrorAppRunner(
        create_app(settings), keepalive_timeout=settings.http_keepalive_timeout, **kwargs
    )


def run_web(settings: Settings) -> None:
    if not (settings.api_keys or settings.api_read_keys):
        raise SystemExit("error: set API_KEYS (comma-separated bearer keys); none is configured")
    with contextlib.suppress(web.GracefulExit):  # SIGTERM or Ctrl-C, once cleaned up
        asyncio.run(serve(settings))


async def serve(settings: Settings) -> None:
    """What web.run_app does (which always makes a plain AppRunner): serve app_runner on
    WEB_HOST:WEB_PORT until SIGINT or SIGTERM, then shut down gracefully."""
    runner = app_runner(settings, handle_signals=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.web_host, settings.web_port)
        await site.start()
        print(f"======== Running on {site.name} ========\n(Press CTRL+C to quit)", flush=True)
        await asyncio.Event().wait()  # a signal raises GracefulExit out of the loop
    finally:
        await runner.cleanup()
