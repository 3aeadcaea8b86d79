"""Schedules API: any job `POST /jobs/*` takes, run on a cron expression or every N seconds.

A schedule's job body is validated here by the same models as the job's own endpoint, so a
schedule that would enqueue a bad job is a 422 at creation, naming `job.body.<field>`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from app.auth import PRINCIPAL, quota_refusals
from app.http import found, json_model, off_loop, read_json_object, status_url
from app.joboptions import JobOptions
from app.jobstatus import read_job
from app.redaction import redact
from app.schemas import (
    RunJob,
    RunList,
    RunView,
    ScheduleList,
    ScheduleRunAccepted,
    ScrapeRequest,
)
from app.state import REDIS, SETTINGS
from asyncjobs.keys import HEX_ID_PATTERN
from asyncjobs.quota import NeverFits, message_quota
from asyncjobs.settings import Settings
from jobs.housekeeping.export import ExportRequest
from jobs.mail.email import EmailSpec, validation_context
from jobs.mail.newsletter import checked_newsletter
from jobs.schedules import (
    Schedule,
    ScheduledJob,
    ScheduleFields,
    ScheduleSpec,
    ScheduleView,
    changed_schedule,
    check_schedule_fits,
    delete_schedule,
    get_schedule,
    list_schedules,
    new_schedule,
    read_runs,
    run_now,
    save_schedule,
    scheduled_job_type,
    set_paused,
    view_of,
)
from jobs.values import now_utc

SCHEDULE_ID_PATTERN = HEX_ID_PATTERN
# The job options a schedule's job takes (run_at and delay_seconds: the schedule says when)
SCHEDULED_OPTIONS = ("priority", "callback_url", "unique_key", "unique_window_seconds")


async def checked_job(request: web.Request, job: ScheduledJob) -> ScheduledJob:
    """The job with its body as its endpoint would take it; 422 naming job.* otherwise."""
    settings = request.app[SETTINGS]
    options = {name: getattr(job, name) for name in SCHEDULED_OPTIONS}
    try:
        checked = JobOptions.model_validate(options, context={"settings": settings})
    except ValidationError as exc:
        raise _prefixed(exc, ("job",)) from None
    if checked.unique_key is not None and job.type == "scrape" and not job.body.get("url"):
        raise web.HTTPUnprocessableEntity(
            text="job.unique_key names one job: give it with a scrape's 'url', not 'urls'"
        )
    try:
        if job.type == "newsletter":  # as POST /jobs/newsletter does: off the event loop
            context = validation_context(settings, settings.newsletter_max_recipients)
            body = await off_loop(request, "the newsletter", checked_newsletter, job.body, context)
        else:
            body = _validated_body(job, settings)
    except ValidationError as exc:
        raise _prefixed(exc, ("job", "body")) from None
    window = checked.unique_window_seconds  # the default filled in
    return job.model_copy(update={"body": body, "unique_window_seconds": window})


def _validated_body(job: ScheduledJob, settings: Settings) -> dict[str, Any]:
    if job.type == "email":
        context = validation_context(settings, settings.mail_max_recipients)
        email = EmailSpec.model_validate(job.body, context=context)
        return email.model_dump(mode="json", by_alias=True)
    if job.type == "scrape":
        limits = {
            "max_urls": settings.max_urls_per_request,
            "max_selectors": settings.max_selectors,
        }
        scrape = ScrapeRequest.model_validate(job.body, context=limits)
        return scrape.model_dump(mode="json", exclude_none=True)
    if job.type == "export":
        return ExportRequest.model_validate(job.body).model_dump(mode="json")
    if job.type != "report":  # a user's job type: its arguments' model
        return scheduled_job_type(job.type).validate(job.body).model_dump(mode="json")
    if job.body:
        raise web.HTTPUnprocessableEntity(text="a report job takes no body (job.body must be {})")
    return {}


def _prefixed(exc: ValidationError, prefix: tuple[str, ...]) -> ValidationError:
    errors: list[Any] = [{**err, "loc": (*prefix, *err["loc"])} for err in exc.errors()]
    return ValidationError.from_exception_data(exc.title, errors)


def shown(schedule: Schedule, now: datetime) -> ScheduleView:
    """What any key may read: the schedule with its job body's secrets redacted (an HTTP
    job's `Authorization` header, a token in a user's job), as dead letters show arguments."""
    view = view_of(schedule, now)
    job = view.job.model_copy(update={"body": redact(view.job.body)})
    return view.model_copy(update={"job": job})


def within_quota(schedule: Schedule, settings: Settings) -> Schedule:
    """The schedule, if its runs can fit its owner's message quota; 422 otherwise (each run is
    charged to the owner when it runs, and skipped when the quota has no room)."""
    try:
        check_schedule_fits(schedule, message_quota(settings), now_utc())
    except NeverFits as exc:
        raise web.HTTPUnprocessableEntity(text=str(exc)) from None
    return schedule


async def create(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    spec = ScheduleSpec.model_validate(await read_json_object(request))
    spec = spec.model_copy(update={"job": await checked_job(request, spec.job)})
    principal = request.get(PRINCIPAL)
    schedule = within_quota(new_schedule(spec, principal and principal.key_id), settings)
    await save_schedule(request.app[REDIS], schedule)
    response = json_model(shown(schedule, now_utc()), status=201)
    response.headers["Location"] = f"/schedules/{schedule.id}"
    return response


async def index(request: web.Request) -> web.Response:
    now = now_utc()
    views = [shown(s, now) for s in await list_schedules(request.app[REDIS])]
    return json_model(ScheduleList(schedules=views))


async def show(request: web.Request) -> web.Response:
    return json_model(shown(await _existing(request), now_utc()))


async def change(request: web.Request) -> web.Response:
    fields = ScheduleFields.model_validate(await read_json_object(request))
    if fields.cron is not None and fields.every is not None:
        raise web.HTTPUnprocessableEntity(text="give at most one of 'cron' or 'every'")
    changes = fields.model_dump(exclude_none=True)
    if fields.job is not None:
        changes["job"] = (await checked_job(request, fields.job)).model_dump()
    schedule = changed_schedule(await _existing(request), changes)
    await save_schedule(request.app[REDIS], within_quota(schedule, request.app[SETTINGS]))
    return json_model(shown(schedule, now_utc()))


async def pause(request: web.Request) -> web.Response:
    return await _set_paused(request, True)


async def resume(request: web.Request) -> web.Response:
    return await _set_paused(request, False)


async def _set_paused(request: web.Request, paused: bool) -> web.Response:
    schedule = await set_paused(request.app[REDIS], await _existing(request), paused)
    return json_model(shown(schedule, now_utc()))


async def runs(request: web.Request) -> web.Response:
    """The last runs, newest first, each job with its status now."""
    schedule = await _existing(request)
    redis, queue = request.app[REDIS], request.app[SETTINGS].queue_name
    views = []
    for run in await read_runs(redis, schedule.id):
        jobs = [
            RunJob(job_id=job_id, status=(await read_job(redis, job_id, queue)).status)
            for job_id in run.job_ids
        ]
        views.append(RunView(
            period=run.period, enqueued_at=run.enqueued_at, jobs=jobs, skipped=run.skipped,
            manual=run.manual,
        ))  # fmt: skip
    return json_model(RunList(runs=views))


async def run(request: web.Request) -> web.Response:
    """Run now, besides the schedule's periods: 202 with the run's job ids; its messages are
    charged to the schedule's owner as a run's are (429 when the quota has no room now)."""
    schedule = await _existing(request)
    try:
        with quota_refusals():
            done = await run_now(request.app[REDIS], request.app[SETTINGS], schedule)
    except ValueError as exc:  # its job type is gone, or its arguments' model changed
        raise web.HTTPUnprocessableEntity(text=f"this schedule cannot run: {exc}") from None
    accepted = ScheduleRunAccepted(
        job_ids=done.job_ids,
        status_urls=[status_url(request, job_id) for job_id in done.job_ids],
        runs_url=f"/schedules/{schedule.id}/runs",
    )
    return json_model(accepted, status=202)


async def remove(request: web.Request) -> web.Response:
    if not await delete_schedule(request.app[REDIS], request.match_info["schedule_id"]):
        raise web.HTTPNotFound(text="no such schedule")
    return web.Response(status=204)


async def _existing(request: web.Request) -> Schedule:
    return found(
        await get_schedule(request.app[REDIS], request.match_info["schedule_id"]), "schedule"
    )


def add_schedule_routes(app: web.Application) -> None:
    one = f"/schedules/{{schedule_id:{SCHEDULE_ID_PATTERN}}}"
    app.router.add_post("/schedules", create)
    app.router.add_get("/schedules", index)
    app.router.add_get(one, show)
    app.router.add_patch(one, change)
    app.router.add_delete(one, remove)
    app.router.add_post(f"{one}/pause", pause)
    app.router.add_post(f"{one}/resume", resume)
    app.router.add_get(f"{one}/runs", runs)
    app.router.add_post(f"{one}/run", run)
