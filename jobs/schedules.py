"""Schedules: any job the API can enqueue, run on a cron expression or every N seconds, in a
time zone. Stored in Redis (JSON per schedule); the worker's `run_schedules` tick enqueues each
due run once per period however many workers tick (a run marker taken with SET NX, and job ids
derived from the period), and keeps the last runs' job ids as the schedule's history.

The job body is validated by the API with the same models as `POST /jobs/<type>` and stored
as validated; each run turns it into fresh calls (a new Message-ID, export id or newsletter id).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from arq.connections import ArqRedis
from croniter import CroniterBadDateError, croniter
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from redis.asyncio import Redis

from asyncjobs import tracing
from asyncjobs.keys import (
    SCHEDULE_KEY_PREFIX,
    SCHEDULES_KEY,
    schedule_charge_key,
    schedule_run_key,
    schedule_runs_key,
)
from asyncjobs.quota import HourlyQuota, NeverFits, QuotaExceeded, message_quota
from asyncjobs.registry import JobType, Priority, job_types
from asyncjobs.settings import Settings
from jobs.context import WorkerContext
from jobs.engine.unique import DEFAULT_WINDOW_S, Unique, holder_of
from jobs.enqueue import enqueue_registered_many
from jobs.mail.newsletter import start_progress
from jobs.retry import classified
from jobs.values import as_text, now_utc

log = logging.getLogger(__name__)

MIN_EVERY_S = 60
HISTORY_KEEP = 50
NEXT_RUNS_SHOWN = 5


def scheduled_job_type(name: str) -> JobType:
    """The registered job type a schedule's `type` names: a built-in by its endpoint's name
    (`email` for send_email), a user's job by its own; ValueError if it cannot be run."""
    schedulable = {t.public_name: t for t in job_types() if t.schedulable and t.public_name}
    if name not in schedulable:
        raise ValueError(f"{name!r} is not a job type; one of: {', '.join(schedulable)}")
    return schedulable[name]


def default_priority(job: ScheduledJob) -> Priority:
    """The job type's own, but a scrape of several URLs is bulk work (as through the API)."""
    if job.type == "scrape" and not job.body.get("url"):
        return "bulk"
    return scheduled_job_type(job.type).priority


def check_cron(expression: str) -> str:
    expression = expression.strip()
    if len(expression.split()) != 5 or not croniter.is_valid(expression):
        raise ValueError(
            f"{expression!r} is not a 5-field cron expression "
            "(minute hour day-of-month month day-of-week)"
        )
    try:  # valid fields can still name a day that never comes (31 February)
        croniter(expression, now_utc()).get_next(datetime)
    except (CroniterBadDateError, ValueError):
        raise ValueError(f"{expression!r} never fires") from None
    return expression


def check_timezone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"{name!r} is not an IANA time zone (e.g. Europe/Paris)") from None
    return name


class ScheduledJob(BaseModel):
    """What runs: a job type and the body `POST /jobs/<type>` takes, plus its priority,
    callback and unique key (run_at and delay_seconds make no sense here: the schedule says
    when). A run whose unique key is held by a job still there records that job's id."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(
        max_length=63, description="email, newsletter, scrape, export, report or a user's job type"
    )
    body: dict[str, Any] = Field(default_factory=dict)
    priority: Priority | None = None
    callback_url: str | None = None
    unique_key: str | None = None
    unique_window_seconds: float | None = None

    def unique(self) -> Unique | None:
        """Its runs' unique key (scoped to the schedule's owner), if it has one."""
        if self.unique_key is None:
            return None
        return Unique(self.unique_key, self.unique_window_seconds or DEFAULT_WINDOW_S)

    @field_validator("type")
    @classmethod
    def _registered(cls, value: str) -> str:
        scheduled_job_type(value)
        return value


class ScheduleFields(BaseModel):
    """What a caller sets; every field optional so a PATCH can reuse it."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, max_length=200)
    cron: str | None = Field(None, max_length=100, description="5-field cron expression")
    every: int | None = Field(None, ge=MIN_EVERY_S, le=366 * 24 * 3600, description="seconds")
    timezone: str | None = Field(None, max_length=64, description="IANA name; default UTC")
    job: ScheduledJob | None = None

    _cron_ok = field_validator("cron")(lambda v: None if v is None else check_cron(v))
    _tz_ok = field_validator("timezone")(lambda v: None if v is None else check_timezone(v))


class ScheduleSpec(ScheduleFields):
    """`POST /schedules`: a job and exactly one of cron or every."""

    job: ScheduledJob

    @model_validator(mode="after")
    def _one_rule(self) -> ScheduleSpec:
        if (self.cron is None) == (self.every is None):
            raise ValueError("give exactly one of 'cron' or 'every'")
        return self


class Schedule(BaseModel):
    id: str
    # The API key (its id) that created it: each run's messages are charged to its quota.
    owner: str | None = None
    name: str | None = None
    cron: str | None = None
    every: int | None = None
    timezone: str = "UTC"
    job: ScheduledJob
    paused: bool = False
    created_at: datetime
    updated_at: datetime

    def period_start(self, now: datetime) -> datetime:
        """The latest time the schedule fired at or before `now` (UTC)."""
        if self.every is not None:
            start = int(now.timestamp()) // self.every * self.every
            return datetime.fromtimestamp(start, UTC)
        local = now.astimezone(ZoneInfo(self.timezone)) + timedelta(seconds=1)
        fired: datetime = croniter(self.cron or "", local).get_prev(datetime)
        return fired.astimezone(UTC)

    def upcoming(self, now: datetime, count: int = NEXT_RUNS_SHOWN) -> list[datetime]:
        if self.every is not None:
            start = self.period_start(now)
            return [start + timedelta(seconds=self.every * n) for n in range(1, count + 1)]
        runs = croniter(self.cron or "", now.astimezone(ZoneInfo(self.timezone)))
        return [runs.get_next(datetime).astimezone(UTC) for _ in range(count)]

    def period_length(self, start: datetime) -> timedelta:
        return self.upcoming(start, 1)[0] - start


# --- cost -------------------------------------------------------------------------------------
RUNS_LOOKED_AHEAD = 1500  # a cron's runs read to find its busiest hour (a minutely one: a day)


def messages_per_run(job: ScheduledJob) -> int:
    """The messages one run sends (its body is stored validated: addresses de-duplicated)."""
    if job.type == "email":
        return sum(len(job.body.get(field) or []) for field in ("to", "cc", "bcc"))
    if job.type == "newsletter":
        return len(job.body.get("recipients") or [])
    return 0


def busiest_hour_runs(schedule: Schedule, now: datetime) -> int:
    """The most runs the schedule makes in any hour: for a cron, over its next runs."""
    if schedule.every is not None:
        return math.ceil(3600 / schedule.every)
    times = [t.timestamp() for t in schedule.upcoming(now, RUNS_LOOKED_AHEAD)]
    busiest, first = 0, 0
    for last, at in enumerate(times):  # a window of one hour slid over the run times
        while at - times[first] >= 3600:
            first += 1
        busiest = max(busiest, last - first + 1)
    return busiest


def check_schedule_fits(schedule: Schedule, quota: HourlyQuota, now: datetime) -> None:
    """NeverFits if one run, or the runs of its busiest hour, need more than the quota."""
    per_run = messages_per_run(schedule.job)
    if not per_run:
        return
    quota.check_fits(per_run, "one run of this schedule")
    runs = busiest_hour_runs(schedule, now)
    quota.check_fits(per_run * runs, f"this schedule's busiest hour ({runs} runs)")


class ScheduleRun(BaseModel):
    period: datetime  # the time the run was due
    enqueued_at: datetime
    job_ids: list[str]
    skipped: str | None = None  # why nothing was enqueued (the owner's quota)
    manual: bool = False  # run now (POST /schedules/{id}/run), outside the periods


class ScheduleView(Schedule):
    next_runs: list[datetime] = []


# --- storage ----------------------------------------------------------------------------------
async def save_schedule(redis: Redis, schedule: Schedule) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.set(SCHEDULE_KEY_PREFIX + schedule.id, schedule.model_dump_json())
        pipe.sadd(SCHEDULES_KEY, schedule.id)
        await pipe.execute()


def new_schedule(spec: ScheduleSpec, owner: str | None) -> Schedule:
    now = now_utc()
    data = spec.model_dump(exclude_none=True)
    return Schedule.model_validate(
        data | {"id": uuid.uuid4().hex, "owner": owner, "created_at": now, "updated_at": now}
    )


async def get_schedule(redis: Redis, schedule_id: str) -> Schedule | None:
    raw = await redis.get(SCHEDULE_KEY_PREFIX + schedule_id)
    return Schedule.model_validate_json(as_text(raw)) if raw else None


async def list_schedules(redis: Redis) -> list[Schedule]:
    ids = sorted(as_text(i) for i in await redis.smembers(SCHEDULES_KEY))  # type: ignore[misc]
    if not ids:
        return []
    raws = await redis.mget([SCHEDULE_KEY_PREFIX + i for i in ids])
    return [Schedule.model_validate_json(as_text(raw)) for raw in raws if raw]


def changed_schedule(schedule: Schedule, changes: dict[str, Any]) -> Schedule:
    merged = schedule.model_dump() | changes | {"updated_at": now_utc()}
    if "cron" in changes:
        merged["every"] = None
    if "every" in changes:
        merged["cron"] = None
    return Schedule.model_validate(merged)


async def update_schedule(redis: Redis, schedule: Schedule, changes: dict[str, Any]) -> Schedule:
    updated = changed_schedule(schedule, changes)
    await save_schedule(redis, updated)
    return updated


async def set_paused(redis: Redis, schedule: Schedule, paused: bool) -> Schedule:
    """Pause or resume (the API's and the dashboard's buttons)."""
    return await update_schedule(redis, schedule, {"paused": paused})


async def delete_schedule(redis: Redis, schedule_id: str) -> bool:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(SCHEDULE_KEY_PREFIX + schedule_id)
        pipe.srem(SCHEDULES_KEY, schedule_id)
        pipe.delete(schedule_runs_key(schedule_id))
        deleted, _, _ = await pipe.execute()
    return bool(deleted)


async def read_runs(redis: Redis, schedule_id: str) -> list[ScheduleRun]:
    raws = await redis.lrange(schedule_runs_key(schedule_id), 0, -1)  # type: ignore[misc]
    return [ScheduleRun.model_validate_json(as_text(raw)) for raw in raws]


def view_of(schedule: Schedule, now: datetime) -> ScheduleView:
    nexts = [] if schedule.paused else schedule.upcoming(now)
    return ScheduleView(**schedule.model_dump(), next_runs=nexts)


# --- running ----------------------------------------------------------------------------------
@classified("maintenance")
async def run_schedules(ctx: WorkerContext) -> dict[str, Any]:
    """Cron tick: enqueue every schedule's run that is due and not yet taken."""
    enqueued = await run_due_schedules(ctx.redis, ctx.settings, now_utc())
    if enqueued:
        log.info("ran %d due schedule(s): %s", len(enqueued), ", ".join(enqueued))
    return {"enqueued": enqueued}


async def run_due_schedules(redis: ArqRedis, settings: Settings, now: datetime) -> list[str]:
    """Each active schedule's current period, once however many workers tick: the run's job
    ids are derived from the period, so a second enqueue is refused; the period's marker
    spares the next ticks the work. The ids of the schedules that ran."""
    ran = []
    for schedule in await list_schedules(redis):
        if schedule.paused:
            continue
        start = schedule.period_start(now)
        if start < schedule.created_at.replace(microsecond=0):
            continue  # the period began before the schedule existed: wait for the next one
        period = int(start.timestamp())
        marker = schedule_run_key(schedule.id, period)
        if await redis.exists(marker):
            continue
        ttl = schedule.period_length(start) + timedelta(days=1)
        held = await held_by(redis, schedule)
        if held is not None:  # the run is the job holding its unique key: nothing is charged
            if await redis.set(marker, "1", ex=ttl, nx=True):
                await record_run(redis, schedule.id, ScheduleRun(
                    period=start, enqueued_at=now_utc(), job_ids=[held]
                ))  # fmt: skip
                ran.append(schedule.id)
            continue
        skipped = await charge_run(redis, settings, schedule, period, ttl)
        if skipped is not None:
            if await redis.set(marker, "skipped", ex=ttl, nx=True):  # one worker records it
                log.warning("schedule %s: run of %s skipped: %s", schedule.id, start, skipped)
                await record_run(redis, schedule.id, ScheduleRun(
                    period=start, enqueued_at=now_utc(), job_ids=[], skipped=skipped
                ))  # fmt: skip
            continue
        try:  # each run a trace of its own, linked to the tick's (asyncjobs.tracing)
            with tracing.new_trace(
                f"schedule {schedule.name or schedule.id}",
                **{"asyncjobs.schedule.id": schedule.id, "asyncjobs.schedule.period": period},
            ):
                job_ids = await enqueue_run(redis, settings, schedule, period)
        except (ValidationError, ValueError) as exc:  # a job type gone, or its model changed
            log.warning("schedule %s: run of %s skipped: %s", schedule.id, start, exc)
            job_ids = []
        await redis.set(marker, "1", ex=ttl)
        if not job_ids:  # another worker enqueued this run first
            continue
        await record_run(
            redis, schedule.id, ScheduleRun(period=start, enqueued_at=now_utc(), job_ids=job_ids)
        )
        ran.append(schedule.id)
    return ran


async def held_by(redis: ArqRedis, schedule: Schedule) -> str | None:
    """The job holding the run's unique key, if it has one and that job is still there."""
    unique = schedule.job.unique()
    if unique is None:
        return None
    try:
        job_type = scheduled_job_type(schedule.job.type)
    except ValueError:
        return None  # its type is gone: the run says so when it tries to enqueue
    return await holder_of(redis, unique, job_type.name, schedule.owner)


async def charge_run(
    redis: ArqRedis, settings: Settings, schedule: Schedule, period: int, ttl: timedelta
) -> str | None:
    """Charge the run's messages to the owner's quota, once per period however many workers
    tick; why the run is skipped, or None if it may go."""
    messages = messages_per_run(schedule.job)
    if schedule.owner is None or not messages:
        return None
    once = (schedule_charge_key(schedule.id, period), ttl.total_seconds())
    try:
        await message_quota(settings).take(
            redis, schedule.owner, messages, f"this run of schedule {schedule.id}", once
        )
    except (QuotaExceeded, NeverFits) as exc:
        return str(exc)
    return None


async def record_run(redis: Redis, schedule_id: str, run: ScheduleRun) -> None:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.lpush(schedule_runs_key(schedule_id), run.model_dump_json())
        pipe.ltrim(schedule_runs_key(schedule_id), 0, HISTORY_KEEP - 1)
        await pipe.execute()


async def run_now(redis: ArqRedis, settings: Settings, schedule: Schedule) -> ScheduleRun:
    """Run the schedule now, paused or not, besides its periods' runs: its ids come from a
    fresh run id (never the period's, which the tick's run then takes), its messages are
    charged to the owner's quota as a run's are (QuotaExceeded or NeverFits: nothing is
    enqueued), and it is kept in the runs history marked manual."""
    scheduled_job_type(schedule.job.type)  # ValueError, before any charge, if the type is gone
    messages = messages_per_run(schedule.job)
    if schedule.owner is not None and messages:
        what = f"a manual run of schedule {schedule.id}"
        await message_quota(settings).take(redis, schedule.owner, messages, what)
    run_id, asked_at = uuid.uuid4().hex, now_utc()
    job_ids = await enqueue_calls(
        redis, settings, schedule, run_id, f"schedule:{schedule.id}:now-{run_id}"
    )
    run = ScheduleRun(period=asked_at, enqueued_at=now_utc(), job_ids=job_ids, manual=True)
    await record_run(redis, schedule.id, run)
    return run


async def last_runs(redis: Redis, schedule_ids: list[str]) -> dict[str, ScheduleRun]:
    """Each schedule's latest run (none yet: absent), in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        for schedule_id in schedule_ids:
            pipe.lindex(schedule_runs_key(schedule_id), 0)
        raws = await pipe.execute()
    return {
        schedule_id: ScheduleRun.model_validate_json(as_text(raw))
        for schedule_id, raw in zip(schedule_ids, raws, strict=True)
        if raw
    }


async def enqueue_run(
    redis: ArqRedis, settings: Settings, schedule: Schedule, period: int
) -> list[str]:
    """One run's jobs, with ids derived from the schedule and the period; the ids of the jobs
    this call enqueued (none if the run was already enqueued)."""
    run_id = hashlib.sha256(f"{schedule.id}:{period}".encode()).hexdigest()[:32]
    prefix = f"schedule:{schedule.id}:{period}"
    return await enqueue_calls(redis, settings, schedule, run_id, prefix)


async def enqueue_calls(
    redis: ArqRedis, settings: Settings, schedule: Schedule, run_id: str, id_prefix: str
) -> list[str]:
    """The jobs of the run `run_id`, each with the id `<id_prefix>:<n>` unless its type names
    it by the run id (an export, a newsletter); the ids of the jobs this call enqueued."""
    job = schedule.job
    function, calls = await run_calls(redis, settings, job, run_id)
    prepared = [
        (call, call.pop("_job_id", None) or f"{id_prefix}:{n}") for n, call in enumerate(calls)
    ]
    ids = await enqueue_registered_many(
        redis, settings, function, prepared,
        priority=job.priority or default_priority(job), callback_url=job.callback_url,
        owner=schedule.owner, unique=job.unique(),
    )  # fmt: skip
    return [job_id for job_id in ids if job_id]


async def run_calls(
    redis: ArqRedis, settings: Settings, job: ScheduledJob, run_id: str
) -> tuple[str, list[dict[str, Any]]]:
    """The function and the calls of one run of `job`. Exports and newsletters are known by
    the run's id (32 hex, the form their download and progress URLs take)."""
    body = json.loads(json.dumps(job.body))  # a copy the calls may keep
    if job.type == "email":  # its Message-ID, fresh per run, is fixed by the enqueue path
        return "send_email", [{"email": body}]
    if job.type == "newsletter":
        await start_progress(redis, run_id, len(body["recipients"]), settings.sent_marker_ttl)
        return "send_newsletter", [{"newsletter_id": run_id, "newsletter": body, "_job_id": run_id}]
    if job.type == "scrape":
        urls = [body["url"]] if body.get("url") else body.get("urls", [])
        selectors = body.get("selectors", {})
        return "scrape", [{"target": {"url": url, "selectors": selectors}} for url in urls]
    if job.type == "export":
        return "export", [{"export_id": run_id, "request": body, "_job_id": run_id}]
    if job.type == "report":
        return "report", [{}]
    return scheduled_job_type(job.type).name, [body]  # a user's job: its validated arguments
