"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetPydanticSchema,
    RootModel,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema

from app.chains import CallbackSpec
from app.mailsink import MailSummary
from asyncjobs.jobstate import JobState
from jobs.deadletter import DeadLetter
from jobs.engine.monitor import StepProgress
from jobs.mail.email import EmailSpec
from jobs.mail.newsletter import BatchProgress, NewsletterSpec
from jobs.mail.smtpconfig import SmtpProblem
from jobs.schedules import ScheduleView
from jobs.scrape.documents import DocumentVersion, StoredDocument
from jobs.scrape.page import MAX_URL_LENGTH, ScrapeTarget
from jobs.scrape.runs import SourceRun
from jobs.scrape.selectors import Selectors
from jobs.scrape.sources import Source
from jobs.webhooks import CallbackRecord

__all__ = ["EmailSpec", "ScrapeRequest"]


def _state_schema(_source: Any, _handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
    """A JobState as a response documents it: an inline `enum` of the states' strings (as a
    Literal is), not a component of its own; validated into a JobState."""
    values = core_schema.literal_schema([state.value for state in JobState])
    return core_schema.no_info_after_validator_function(JobState, values)


# Every state field of the API: its OpenAPI enum is JobState's values.
JobStateField = Annotated[JobState, GetPydanticSchema(_state_schema)]


class ScrapeRequest(BaseModel):
    """`POST /jobs/scrape`: one `url` or a list of `urls`, sharing optional CSS `selectors`."""

    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl | None = Field(None, max_length=MAX_URL_LENGTH)
    urls: list[AnyHttpUrl] | None = Field(None, min_length=1)
    selectors: Selectors = Field(default_factory=dict)
    force: bool = Field(False, description="fetch unconditionally, as if never seen before")
    callback: CallbackSpec | None = Field(
        None, description="with `urls`: run once when every page's job has ended"
    )

    @model_validator(mode="after")
    def _one_of_url_or_urls(self, info: ValidationInfo) -> ScrapeRequest:
        if (self.url is None) == (self.urls is None):
            raise ValueError("give exactly one of 'url' or 'urls'")
        if self.callback is not None and self.urls is None:
            raise ValueError("'callback' goes with 'urls' (a batch); one job takes 'then'")
        limit = (info.context or {}).get("max_urls")
        if self.urls is not None and limit is not None and len(self.urls) > limit:
            raise ValueError(f"{len(self.urls)} urls is more than the limit of {limit}")
        if self.urls is not None and any(len(str(u)) > MAX_URL_LENGTH for u in self.urls):
            raise ValueError(f"every url must be at most {MAX_URL_LENGTH} characters")
        limit = (info.context or {}).get("max_selectors")
        if limit is not None and len(self.selectors) > limit:
            raise ValueError(f"{len(self.selectors)} selectors is more than the limit of {limit}")
        return self

    def targets(self) -> list[ScrapeTarget]:
        urls = [self.url] if self.url is not None else list(self.urls or [])
        return [ScrapeTarget(url=u, selectors=self.selectors, force=self.force) for u in urls]


class JobRef(BaseModel):
    job_id: str
    status_url: str


class JobAccepted(JobRef):
    # present (true) only when the request's `unique_key` was held: `job_id` is the job that
    # was already there, nothing new was enqueued
    existing: bool = Field(
        False,
        exclude_if=lambda value: not value,
        description="true: the job holding the request's unique_key, already there",
    )


class EmailAccepted(JobAccepted):
    message_id: str


class ScrapeAccepted(JobAccepted):
    url: str


class NewsletterAccepted(JobAccepted):
    recipients: int
    callback_job_id: str | None = None  # its callback's job, if it named one


class NewsletterRequest(NewsletterSpec):
    """`POST /jobs/newsletter`: the newsletter, and an optional callback."""

    callback: CallbackSpec | None = Field(
        None,
        description="run once when every recipient's message has been sent, failed for good "
        "or been aborted",
    )


class AbortAccepted(JobRef):  # an abort enqueues nothing: no `existing`
    status_before: JobStateField


class DeadLetterPage(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[DeadLetter]


class BatchJobRequest(BaseModel):
    """One job of `POST /batches`: its type as callers name it, and its fields."""

    model_config = ConfigDict(extra="forbid")

    type: str
    body: dict[str, Any] = Field(default_factory=dict)


class BatchRequest(BaseModel):
    """`POST /batches`: jobs enqueued together, and one callback when all have ended."""

    model_config = ConfigDict(extra="forbid")

    jobs: list[BatchJobRequest] = Field(
        min_length=1, description="at most BATCH_MAX_JOBS (100 by default)"
    )
    callback: CallbackSpec | None = None

    @field_validator("jobs")
    @classmethod
    def _at_most(cls, jobs: list[BatchJobRequest], info: ValidationInfo) -> list[BatchJobRequest]:
        limit = (info.context or {}).get("max_jobs")
        if not isinstance(limit, int):
            raise TypeError("BatchRequest is validated with context={'max_jobs': int}")
        if len(jobs) > limit:
            raise ValueError(f"at most {limit} jobs in one batch (BATCH_MAX_JOBS)")
        return jobs


class BatchAccepted(BaseModel):
    batch_id: str
    batch_url: str
    job_ids: list[str]
    callback_job_id: str | None = None


class ScrapeBatchAccepted(BaseModel):
    batch_id: str
    batch_url: str  # GET it for the progress of the whole batch
    jobs: list[ScrapeAccepted]
    callback_job_id: str | None = None  # its callback's job, if it named one


class ScrapeBatchJob(BaseModel):
    job_id: str
    url: str | None = None  # a scrape batch's
    type: str | None = None  # a `POST /batches` batch's
    status: JobStateField
    status_url: str


class ScrapeBatch(BaseModel):
    """`GET /batches/{batch_id}`: the jobs of a multi-URL scrape and how far they are."""

    batch_id: str
    total: int
    finished: int  # complete, failed or aborted
    by_status: dict[str, int]
    jobs: list[ScrapeBatchJob]


class ScrapeAcceptedAny(RootModel[ScrapeAccepted | ScrapeBatchAccepted]):
    """`POST /jobs/scrape` answers one job for `url`, a list for `urls`."""


class WaitingFor(BaseModel):
    """A waiting job's parents: the jobs named in its `after`, its `then`'s parent, or its
    batch's jobs (a callback: the first ones named, and the batch)."""

    kind: Literal["after", "then", "callback"]
    job_ids: list[str]
    batch_id: str | None = None
    pending: int  # parents that have not ended yet
    total: int


class JobView(BaseModel):
    job_id: str
    status: JobStateField
    function: str | None = None
    enqueue_time: datetime | None = None
    start_time: datetime | None = None
    finish_time: datetime | None = None
    tries: int | None = None
    result: Any = None
    error: str | None = None  # why it failed; while it waits for a retry, why the last try failed
    warning: str | None = None  # complete, with something to look at (recipients refused)
    next_try_at: datetime | None = None  # deferred for a retry: when the next try is due
    due_at: datetime | None = None  # deferred (run_at, delay_seconds or a retry): when it is due
    callback: CallbackRecord | None = None  # its completion webhook, once the job has ended
    # a newsletter in progress: its job fans out the messages, then they are sent
    phase: Literal["fanning_out", "sending"] | None = None
    progress: BatchProgress | None = None  # bulk jobs: messages sent / failed / pending
    steps: StepProgress | None = None  # long jobs (exports): done / total, current step
    waiting_for: WaitingFor | None = None  # waiting: the jobs it waits for


class WorkerHealth(BaseModel):
    alive: bool
    heartbeat: str | None = None


class Health(BaseModel):
    status: Literal["ok", "degraded", "unavailable"]
    redis: Literal["ok", "unreachable"]
    worker: WorkerHealth
    version: str
    # present only while a worker's SMTP configuration fails (a wrong password, an untrusted
    # certificate, a refused MAIL_FROM): why, and since when; the status is then degraded
    smtp: SmtpProblem | None = Field(None, exclude_if=lambda value: value is None)


class SourceList(BaseModel):
    sources: list[Source]


class SourceRunRequest(BaseModel):
    """`POST /sources/{id}/run`: an optional body."""

    model_config = ConfigDict(extra="forbid")

    force: bool = Field(False, description="fetch every page unconditionally (no 304s)")


class SourceRunAccepted(BaseModel):
    run_id: str
    job_id: str  # the start page's job
    status_url: str
    runs_url: str


class SourceRunList(BaseModel):
    runs: list[SourceRun]  # newest first


class DocumentList(BaseModel):
    total: int
    offset: int
    limit: int
    items: list[StoredDocument]  # without text and metadata; GET /documents/{id} has them


class DocumentDetail(BaseModel):
    document: StoredDocument
    versions: list[DocumentVersion]  # newest first


class MailList(BaseModel):
    messages: list[MailSummary]


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    error: str
    message: str
    details: list[ErrorDetail] = []


class JobNotFound(RootModel[JobView | ErrorBody]):
    """404 on a job: a JobView with status not_found, or an error for an id no job can have."""


class ScheduleList(BaseModel):
    schedules: list[ScheduleView]


class RunJob(BaseModel):
    job_id: str
    status: JobStateField


class RunView(BaseModel):
    period: datetime  # when the run was due
    enqueued_at: datetime
    jobs: list[RunJob]
    skipped: str | None = None  # why nothing was enqueued: the owner's message quota was full
    manual: bool = False  # asked for with POST /schedules/{id}/run (period: when it was asked)


class ScheduleRunAccepted(BaseModel):
    job_ids: list[str]  # the run's jobs, enqueued
    status_urls: list[str]
    runs_url: str  # the schedule's runs: this one first, marked manual


class RunList(BaseModel):
    runs: list[RunView]
