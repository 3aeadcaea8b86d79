"""The dashboard's handlers: read with data.py, act with app/actions.py, render a template."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp_jinja2
from aiohttp import web
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from app import actions, mailsink
from app.actions import ABORTABLE
from app.auth import KEYRING, Principal
from app.dashboard import joblist
from app.dashboard.banner import WORKER_BANNER
from app.dashboard.data import (
    JOB_STATES,
    WINDOWS,
    MinuteCount,
    read_arguments,
    read_cron,
    read_overview,
    read_sources,
)
from app.dashboard.jobpage import folded, read_tries, result_digest, shown_result
from app.dashboard.session import (
    CSRF_FIELD,
    SESSION,
    clear_session_cookie,
    create_session,
    delete_session,
    load_session,
    login_token,
    login_token_ok,
    read_form,
    set_login_cookie,
    set_session_cookie,
)
from app.errors import Handler
from app.http import ANY_JOB_ID_PATTERN
from app.jobstatus import read_job_with_progress
from app.routes.schedules import shown
from app.schemas import JobView
from app.state import REDIS, SETTINGS
from asyncjobs.jobstate import JobState
from asyncjobs.keys import HEX_ID_PATTERN
from asyncjobs.quota import Window
from asyncjobs.registry import job_types
from asyncjobs.settings import Settings
from jobs.housekeeping.export import CONTENT_TYPES, EXPORT_NAME_PATTERN
from jobs.schedules import get_schedule, last_runs, list_schedules, set_paused
from jobs.scrape.runs import RunInProgress, load_runs, run_now
from jobs.scrape.sources import get_source
from jobs.values import now_utc
from jobs.worker import cron_jobs

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.3  # how often a job's event stream looks at the job
STREAM_MAX_S = 600  # then the browser's EventSource reconnects: no stream lives for ever
DEAD_LETTERS_SHOWN = 100
MAIL_SHOWN = 100
CHART_WIDTH, CHART_HEIGHT = 600, 120


def _redis(request: web.Request) -> ArqRedis:
    return request.config_dict[REDIS]


def _settings(request: web.Request) -> Settings:
    return request.config_dict[SETTINGS]


def _url(request: web.Request, route: str, **parts: str) -> str:
    return str(request.app.router[route].url_for(**parts))


def see_other(location: str) -> web.Response:
    """After a POST: the browser GETs `location` (and reloading it does not POST again)."""
    return web.Response(status=303, headers={"Location": location})


def when(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if moment else ""


def pretty(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, ensure_ascii=False)


def render(
    request: web.Request, template: str, context: dict[str, Any], *, status: int = 200
) -> web.Response:
    base = {
        "session": request.get(SESSION),
        "csrf_field": CSRF_FIELD,
        "mail_enabled": _settings(request).mail_sink_dir is not None,
        "path": request.path,
        "worker_banner": request.get(WORKER_BANNER),  # jobs due, no worker: banner.py
    }
    return aiohttp_jinja2.render_template(template, request, base | context, status=status)


# -- errors --


@web.middleware
async def html_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors on dashboard pages are pages too (the API's JSON errors are for API clients)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = (exc.text or "").removeprefix(f"{exc.status}: ")  # aiohttp's "404: Not Found"
        context = {
            "status": exc.status,
            "reason": exc.reason,
            "message": "" if message == exc.reason else message,
        }
        return render(request, "error.html", context, status=exc.status)
    except (RedisError, ConnectionError) as exc:
        log.warning("broker unavailable on %s %s: %s", request.method, request.path, exc)
        context = {
            "status": 503,
            "reason": "Service Unavailable",
            "message": "The job broker (Redis) is unavailable; try again later.",
        }
        return render(request, "error.html", context, status=503)


# -- login --


def render_login(request: web.Request, error: str | None, *, status: int = 200) -> web.Response:
    """The form, its CSRF token both in a hidden field and in the cookie it must match."""
    token = login_token(request)
    response = render(request, "login.html", {"error": error, "login_token": token}, status=status)
    set_login_cookie(response, request, token)
    return response


async def login_form(request: web.Request) -> web.Response:
    return render_login(request, None)


async def login(request: web.Request) -> web.Response:
    """Sign in with an API key. Failed tries are counted per client address in Redis: past
    `login_max_failures` in `login_failure_window` seconds, the form answers 429 until the
    window ends (keys are long and random; this keeps guessing from being free).

    The body is read first, within HTTP_BODY_TIMEOUT (408), and the form's CSRF token checked
    (403); neither counts as a failure: a slow or forged post cannot lock an address out."""
    form = await read_form(request)
    if not login_token_ok(request, form):
        log.warning("dashboard sign-in without the form's CSRF token from %s", request.remote)
        error = "This form has expired or did not come from this site; please sign in again."
        return render_login(request, error, status=403)
    settings = request.config_dict[SETTINGS]
    failures = Window(f"login:{request.remote or '-'}", settings.login_failure_window)
    now = time.time()
    # Counted as a failure before the key is looked at, in one Redis command: N concurrent
    # tries count N (a check, then a count, let 200 concurrent guesses through a limit of 10).
    # A good key gives its count back.
    if await failures.add(_redis(request), now) > settings.login_max_failures:
        retry_after = failures.retry_after(now)
        error = f"Too many failed sign-ins; try again in {retry_after} s."
        response = render_login(request, error, status=429)
        response.headers["Retry-After"] = str(retry_after)
        return response
    principal = _principal_of(request, form.get("key"))
    if principal is None:
        log.warning("dashboard sign-in with an invalid key from %s", request.remote)
        return render_login(request, "That key is not valid.", status=401)
    await failures.give_back(_redis(request), now)
    return await _signed_in(request, principal)


def _principal_of(request: web.Request, key: object) -> Principal | None:
    if not isinstance(key, str) or not key.strip():
        return None
    return request.config_dict[KEYRING].identify(key.strip())


async def _signed_in(request: web.Request, principal: Principal) -> web.Response:
    previous = await load_session(request)
    if previous is not None:  # a fresh id at every login: no session fixation
        await delete_session(_redis(request), previous)
    session = await create_session(_redis(request), principal)
    response = see_other(_url(request, "overview"))
    set_session_cookie(response, request, session)
    return response


async def logout(request: web.Request) -> web.Response:
    await delete_session(_redis(request), request[SESSION])
    response = see_other(_url(request, "login"))
    clear_session_cookie(response)
    return response


# -- overview --


@dataclass(frozen=True)
class Bar:
    x: float
    width: float
    completed_y: float
    completed_height: float
    failed_y: float
    failed_height: float
    label: str


def chart_bars(minutes: list[MinuteCount]) -> list[Bar]:
    """Stacked bars, completed below failed, scaled to the busiest minute."""
    peak = max((m.completed + m.failed for m in minutes), default=0) or 1
    width = CHART_WIDTH / max(len(minutes), 1)
    bars = []
    for i, minute in enumerate(minutes):
        completed_height = CHART_HEIGHT * minute.completed / peak
        failed_height = CHART_HEIGHT * minute.failed / peak
        completed_y = CHART_HEIGHT - completed_height
        bars.append(
            Bar(
                x=round(i * width, 1),
                width=round(width * 0.8, 1),
                completed_y=round(completed_y, 1),
                completed_height=round(completed_height, 1),
                failed_y=round(completed_y - failed_height, 1),
                failed_height=round(failed_height, 1),
                label=f"{minute.start:%H:%M} UTC: {minute.completed} completed, "
                f"{minute.failed} failed",
            )
        )
    return bars


async def overview(request: web.Request) -> web.Response:
    data = await read_overview(_redis(request), _settings(request).queue_name)
    context = {
        "overview": data,
        "bars": chart_bars(data.minutes),
        "chart_width": CHART_WIDTH,
        "chart_height": CHART_HEIGHT,
    }
    return render(request, "overview.html", context)


# -- jobs --


def _function_names(settings: Settings) -> list[str]:
    names = [t.name for t in job_types()] + [c.name for c in cron_jobs(settings)]
    return sorted(set(names))


async def _job_list(request: web.Request) -> dict[str, Any]:
    """The rows of one page of the jobs list, and the links to the next page and the first."""
    query = joblist.JobQuery.from_query(request.query)
    page = await joblist.list_page(_redis(request), _settings(request).queue_name, query)
    jobs_url = request.app.router["jobs"].url_for()
    older = page.next_cursor and jobs_url.with_query(query.params(after=page.next_cursor))
    return {
        "page": page,
        "query": query,
        "older_url": str(older) if older else None,
        "first_url": str(jobs_url.with_query(query.params())) if query.after else None,
        "scan_limit": joblist.SCAN_LIMIT,
        "members_shown": joblist.MEMBERS_SHOWN,
        "waiting_shown": joblist.WAITING_SHOWN,
        "page_rows": joblist.PAGE_ROWS,
    }


async def jobs_page(request: web.Request) -> web.Response:
    context = await _job_list(request) | {
        "functions": _function_names(_settings(request)),
        "states": JOB_STATES,
        "windows": list(WINDOWS),
    }
    return render(request, "jobs.html", context)


async def job_rows(request: web.Request) -> web.Response:
    """The rows of the jobs table alone: the page fetches them every second."""
    return render(request, "job_rows.html", await _job_list(request))


def job_state(request: web.Request, view: JobView) -> dict[str, Any]:
    """What a job page shows, formatted once here for the page and for its event stream."""
    return {
        "job_id": view.job_id,
        "status": view.status,
        "function": view.function or "",
        "tries": "" if view.tries is None else str(view.tries),
        "enqueue_time": when(view.enqueue_time),
        "start_time": when(view.start_time),
        "finish_time": when(view.finish_time),
        "next_try_at": when(view.next_try_at),
        "due_at": when(view.due_at),
        "callback": _callback(view),
        "result_digest": result_digest(view.result),  # the page fetches the result on a change
        "error": view.error or "",
        "progress": _progress(view),
        "finished": view.status not in ABORTABLE,
        "download": _export_download(request, view),
        "waiting_for": _waiting_for(view),
    }


def _waiting_for(view: JobView) -> dict[str, Any] | None:
    """A waiting job's parents (linked on its page), how many are still pending, and its
    batch (a callback's parents are the batch's first jobs)."""
    waits = view.waiting_for
    if waits is None:
        return None
    return {
        "kind": waits.kind,
        "job_ids": waits.job_ids,
        "batch_id": waits.batch_id,
        "text": f"{waits.pending} of {waits.total} not ended yet",
    }


def _callback(view: JobView) -> str:
    """The completion webhook's delivery, in a line: state, tries, last answer or error."""
    hook = view.callback
    if hook is None:
        return ""
    last = f"HTTP {hook.last_status}" if hook.last_status else hook.last_error or ""
    return f"{hook.state} after {hook.tries} tries to {hook.url}" + (f" ({last})" if last else "")


def _progress(view: JobView) -> dict[str, Any] | None:
    """For the progress bar: a newsletter's messages, or an export's rows."""
    if view.progress is not None:
        batch = view.progress
        text = f"{batch.sent} sent, {batch.failed} failed, {batch.pending} pending of {batch.total}"
        return {"done": batch.sent + batch.failed, "total": batch.total, "text": text}
    if view.steps is not None:
        steps = view.steps
        total = steps.total if steps.total is not None else steps.done
        text = f"{steps.step}: {steps.done} of {total}"
        return {"done": steps.done, "total": total, "text": text}
    return None


def _export_download(request: web.Request, view: JobView) -> str | None:
    if (
        view.function != "export"
        or view.status != JobState.COMPLETE
        or not isinstance(view.result, dict)
    ):
        return None
    name = view.result.get("name")
    if not isinstance(name, str) or not re.fullmatch(EXPORT_NAME_PATTERN, name):
        return None
    return _url(request, "export_file", name=name)


async def job_page(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    redis = _redis(request)
    view = await read_job_with_progress(redis, _settings(request).queue_name, job_id)
    if view.status == JobState.NOT_FOUND:
        raise web.HTTPNotFound(text=f"No job {job_id}: never enqueued, or its result expired.")
    arguments = await read_arguments(redis, job_id)
    context = {
        "job": job_state(request, view),
        "arguments": folded(request, arguments, "arguments"),
        "result": folded(request, shown_result(view.result), "result"),
        "tries": await read_tries(redis, view),
        "events_url": _url(request, "job_events", job_id=job_id),
        "abort_url": _url(request, "job_abort", job_id=job_id),
        "tries_url": _url(request, "job_tries", job_id=job_id),
        "result_url": _url(request, "job_result", job_id=job_id),
    }
    return render(request, "job.html", context)


async def job_events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: the job's state each time it changes, then `end` once finished."""
    job_id = request.match_info["job_id"]
    redis, queue_name = _redis(request), _settings(request).queue_name
    # X-Accel-Buffering: a proxy such as nginx passes each event on at once, unbuffered
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    await response.write(b"retry: 1000\n\n")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STREAM_MAX_S
    last = ""
    try:
        while loop.time() < deadline and not _client_gone(request):
            state = job_state(request, await read_job_with_progress(redis, queue_name, job_id))
            payload = json.dumps(state)  # one line: json.dumps escapes newlines in strings
            if payload != last:
                await response.write(f"data: {payload}\n\n".encode())
                last = payload
            if state["finished"]:
                await response.write(b"event: end\ndata: {}\n\n")  # so the browser stops
                break
            await asyncio.sleep(POLL_INTERVAL_S)
    except ConnectionResetError:
        pass  # the browser left
    except RedisError as exc:  # the headers are sent: end the stream, the browser retries
        log.warning("job event stream for %s stopped: %s", job_id, exc)
    return response


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def abort_job(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    before = await actions.abort(_redis(request), _settings(request).queue_name, job_id)
    if before.status == JobState.NOT_FOUND:
        raise web.HTTPNotFound(text=f"No job {job_id}.")
    if before.status not in ABORTABLE:
        raise web.HTTPConflict(text=f"Job {job_id} has already finished ({before.status}).")
    return see_other(_url(request, "job", job_id=job_id))


# -- dead letters --


# the list page and its bulk actions: app/dashboard/bulk.py


async def retry_dead_letter(request: web.Request) -> web.Response:
    job_id = await actions.retry_dead_letter(_redis(request), request.match_info["entry_id"])
    if job_id is None:
        raise web.HTTPNotFound(text="No such dead-letter entry (already retried or deleted?).")
    return see_other(_url(request, "job", job_id=job_id))


# -- cron, sources, exports, mail --


async def cron_page(request: web.Request) -> web.Response:
    redis = _redis(request)
    rows = await read_cron(redis, _settings(request))
    now = now_utc()
    schedules = []
    for schedule in await list_schedules(redis):
        action = "schedule_resume" if schedule.paused else "schedule_pause"
        schedules.append((shown(schedule, now), _url(request, action, schedule_id=schedule.id)))
    latest = await last_runs(redis, [s.id for s, _ in schedules])  # run now's among them
    context = {"rows": rows, "schedules": schedules, "last_runs": latest}
    return render(request, "cron.html", context)


async def pause_schedule(request: web.Request) -> web.Response:
    return await _pause_or_resume(request, paused=True)


async def resume_schedule(request: web.Request) -> web.Response:
    return await _pause_or_resume(request, paused=False)


async def _pause_or_resume(request: web.Request, paused: bool) -> web.Response:
    redis = _redis(request)
    schedule = await get_schedule(redis, request.match_info["schedule_id"])
    if schedule is None:
        raise web.HTTPNotFound(text="No such schedule.")
    await set_paused(redis, schedule, paused)
    return see_other(_url(request, "cron"))


async def sources_page(request: web.Request) -> web.Response:
    return render(request, "sources.html", {"rows": await read_sources(_redis(request))})


async def source_page(request: web.Request) -> web.Response:
    """One source: its settings, its last runs (newest first) and a button to run it now."""
    redis = _redis(request)
    source = await get_source(redis, request.match_info["source_id"])
    if source is None:
        raise web.HTTPNotFound(text="No such source.")
    context = {
        "source": source,
        "runs": await load_runs(redis, source.id),
        "run_url": _url(request, "source_run", source_id=source.id),
    }
    return render(request, "source.html", context)


async def run_source(request: web.Request) -> web.Response:
    """Run now, as `POST /sources/<id>/run`; 409 while a run is in progress."""
    source_id = request.match_info["source_id"]
    if await get_source(_redis(request), source_id) is None:
        raise web.HTTPNotFound(text="No such source.")
    force = (await read_form(request)).get("force") == "1"
    try:
        await run_now(_redis(request), _settings(request), source_id, force,
                      owner=request[SESSION].key_id)  # fmt: skip
    except RunInProgress as exc:
        raise web.HTTPConflict(text=f"{exc}: wait for it to finish.") from None
    return see_other(_url(request, "source", source_id=source_id))


async def export_csv(request: web.Request) -> web.Response:
    job_id = await actions.export_all_csv(_redis(request))
    return see_other(_url(request, "job", job_id=job_id))


async def export_file(request: web.Request) -> web.StreamResponse:
    """The API's GET /exports/{name} wants a bearer key a browser does not send: the same file,
    for a session."""
    name = request.match_info["name"]  # the route pattern allows no path separators
    path = _settings(request).exports_dir / name
    if not await asyncio.to_thread(path.is_file):
        raise web.HTTPNotFound(text=f"No export {name}: not finished, expired or never requested.")
    headers = {
        "Content-Type": CONTENT_TYPES[name.rpartition(".")[2]],
        "Content-Disposition": f'attachment; filename="{name}"',
    }
    return web.FileResponse(path, headers=headers)


async def mail_page(request: web.Request) -> web.Response:
    folder = _settings(request).mail_sink_dir
    assert folder is not None  # the route exists only then
    messages = await mailsink.list_messages(folder, MAIL_SHOWN)
    return render(request, "mail.html", {"messages": messages})


ID_PATTERN = ANY_JOB_ID_PATTERN
JOB = f"{{job_id:{ID_PATTERN}}}"


def add_dashboard_routes(app: web.Application, settings: Settings) -> None:
    """Paths are relative to /ui, where the dashboard is mounted."""
    app.router.add_get("", overview, name="overview")
    app.router.add_get("/", overview)
    app.router.add_get("/login", login_form, name="login")
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout, name="logout")
    app.router.add_get("/jobs", jobs_page, name="jobs")
    app.router.add_get("/jobs/rows", job_rows, name="job_rows")  # before /jobs/{job_id}
    app.router.add_get(f"/jobs/{JOB}", job_page, name="job")
    app.router.add_get(f"/jobs/{JOB}/events", job_events, name="job_events", allow_head=False)
    app.router.add_post(f"/jobs/{JOB}/abort", abort_job, name="job_abort")
    app.router.add_post(
        f"/dead-letter/{{entry_id:{ID_PATTERN}}}/retry", retry_dead_letter, name="retry"
    )
    app.router.add_get("/cron", cron_page, name="cron")
    schedule = f"/schedules/{{schedule_id:{HEX_ID_PATTERN}}}"
    app.router.add_post(f"{schedule}/pause", pause_schedule, name="schedule_pause")
    app.router.add_post(f"{schedule}/resume", resume_schedule, name="schedule_resume")
    app.router.add_get("/sources", sources_page, name="sources")
    app.router.add_post("/sources/export", export_csv, name="export_csv")
    source = f"/sources/{{source_id:{HEX_ID_PATTERN}}}"
    app.router.add_get(source, source_page, name="source")
    app.router.add_post(f"{source}/run", run_source, name="source_run")
    app.router.add_get(f"/exports/{{name:{EXPORT_NAME_PATTERN}}}", export_file, name="export_file")
    if settings.mail_sink_dir is not None:
        app.router.add_get("/mail", mail_page, name="mail")
