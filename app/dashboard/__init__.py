"""The operator dashboard: server-rendered pages under /ui (Jinja2, a little plain JavaScript).

A sub-application, so its session check, HTML error pages and response headers apply to /ui
only; the API's bearer keys and JSON errors stay as they are everywhere else.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from app.dashboard.banner import worker_banner
from app.dashboard.bulk import add_bulk_routes
from app.dashboard.jobpage import add_job_page_routes
from app.dashboard.mailview import add_mail_routes
from app.dashboard.session import STATIC_PREFIX, require_session
from app.dashboard.trends import add_trends_routes
from app.dashboard.views import JOB, add_dashboard_routes, html_errors, when
from app.state import SETTINGS

HERE = Path(__file__).parent
PREFIX = "/ui"
# Scripts and styles from our own files only: no inline script can run, whatever a page shows.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


def setup_dashboard(app: web.Application) -> None:
    dashboard = web.Application(middlewares=[html_errors, require_session, worker_banner])
    env = aiohttp_jinja2.setup(
        dashboard,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every value is escaped unless a template says otherwise (none do)
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    add_dashboard_routes(dashboard, app[SETTINGS])
    add_job_page_routes(dashboard, JOB)
    if app[SETTINGS].mail_sink_dir is not None:
        add_mail_routes(dashboard)
    add_bulk_routes(dashboard)
    add_trends_routes(dashboard)
    dashboard.router.add_static("/static", HERE / "static", name="static")
    dashboard.on_response_prepare.append(_security_headers)
    app.add_subapp(PREFIX, dashboard)


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Referrer-Policy", "same-origin")
    if not request.path.startswith(STATIC_PREFIX):  # pages show live data and sit behind a login
        headers.setdefault("Cache-Control", "no-store")
