"""The API's side of jobs that wait for jobs (jobs/engine/dependencies.py): the `then` and
`callback` request models, and turning one into the engine's FollowUp, checked as its own
`POST /jobs/<type>` would check it (a 422 naming the field, before anything is stored).

A follow-up names its job type as callers do: a job of yours by its name, a built-in by its
endpoint. A job of yours receives what it waited for as an argument (`result_argument`, by
default `previous` for `then` and `batch` for a callback) when its model has that field; the
built-ins that can follow are `email` (after an export, the export's file is attached; any
other parent's result is not in the message) and `http` (its body is fixed at enqueue: the
result is not sent), and a callback `url` gets a signed POST of the batch's counts.
"""

from __future__ import annotations

from typing import Any

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationError, model_validator

from asyncjobs.addresses import new_message_id
from asyncjobs.registry import JobType, Priority, get_job_type, job_types
from asyncjobs.settings import Settings
from jobs.engine.dependencies import Dependencies, FollowUp
from jobs.engine.queue import CALLBACK_KWARG
from jobs.mail.email import EmailSpec, validation_context
from jobs.scrape.page import MAX_URL_LENGTH

MAX_AFTER = 100  # job ids one `after` may name (a batch's callback waits on any number)
DEFAULT_THEN_ARGUMENT = "previous"
DEFAULT_CALLBACK_ARGUMENT = "batch"
# Built-ins that may follow another job or call back a batch, by endpoint (others are refused)
FOLLOWING_BUILTINS = frozenset({"email", "http"})
# The hand-off argument of a built-in that uses its parent's result (jobs.mail.email: an
# export's file attached); the other built-ins that can follow get nothing.
BUILTIN_HAND_OFF = {"send_email": "previous"}


class FollowUpOptions(BaseModel):
    """A follow-up's own options: its priority, its completion webhook, its own follow-up."""

    model_config = ConfigDict(extra="forbid")

    priority: Priority | None = None
    callback_url: AnyHttpUrl | None = Field(None, max_length=MAX_URL_LENGTH)
    then: ThenSpec | None = None


class ThenSpec(BaseModel):
    """`then`: a job enqueued now that runs once this one has completed (cancelled if it
    fails for good), with its result."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="a job of yours by its name, or a built-in: email, http")
    body: dict[str, Any] = Field(
        default_factory=dict, description="its fields, as POST /jobs/<type> takes them"
    )
    result_argument: str = Field(
        DEFAULT_THEN_ARGUMENT,
        description="the argument of your job that receives this job's result",
    )
    options: FollowUpOptions | None = None


class CallbackSpec(BaseModel):
    """A batch's `callback`: one job (`type`, `body`) or one `url` (a signed POST), run once
    when every job of the batch has ended, with the counts by outcome."""

    model_config = ConfigDict(extra="forbid")

    url: AnyHttpUrl | None = Field(None, max_length=MAX_URL_LENGTH)
    type: str | None = None
    body: dict[str, Any] = Field(default_factory=dict)
    result_argument: str = Field(
        DEFAULT_CALLBACK_ARGUMENT,
        description="the argument of your job that receives {batch_id, total, counts}",
    )
    options: FollowUpOptions | None = None

    @model_validator(mode="after")
    def _one_of_url_or_type(self) -> CallbackSpec:
        if (self.url is None) == (self.type is None):
            raise ValueError("give one of 'url' or 'type'")
        return self


FollowUpOptions.model_rebuild()


def dependencies_of(
    after: list[str] | None, allow_failure: bool, then: ThenSpec | None, settings: Settings
) -> Dependencies | None:
    """The engine's Dependencies for a request's `after`, `allow_failure` and `then`."""
    if not after and then is None:
        return None
    follow = follow_up_of(then, settings) if then is not None else None
    return Dependencies(tuple(after or ()), allow_failure, follow)


def follow_up_of(spec: ThenSpec, settings: Settings) -> FollowUp:
    """A `then`, checked, as the engine enqueues it (its own `then` too)."""
    options = spec.options or FollowUpOptions()
    follow = job_call(spec.type, spec.body, spec.result_argument, settings)
    kwargs = follow.kwargs | option_kwargs(options)
    nested = follow_up_of(options.then, settings) if options.then is not None else None
    return FollowUp(follow.function, kwargs, follow.argument, nested)


def callback_of(spec: CallbackSpec, settings: Settings) -> FollowUp:
    """A batch's callback, checked: a job, or a signed POST to its URL (a webhook delivery
    whose payload gets the counts)."""
    if spec.url is not None:
        if settings.webhook_secret is None:
            raise ValueError("this server has no WEBHOOK_SECRET to sign callbacks with")
        payload = {"event": "batch.finished"}
        return FollowUp("deliver_webhook", {"url": str(spec.url), "payload": payload}, "payload")
    assert spec.type is not None  # one of the two, by the model's check
    follow = job_call(spec.type, spec.body, spec.result_argument, settings)
    kwargs = follow.kwargs | option_kwargs(spec.options or FollowUpOptions())
    return FollowUp(follow.function, kwargs, follow.argument)


def option_kwargs(options: FollowUpOptions) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if options.priority is not None:
        kwargs["_priority"] = options.priority
    if options.callback_url is not None:
        kwargs[CALLBACK_KWARG] = str(options.callback_url)
    return kwargs


def job_call(name: str, body: dict[str, Any], argument: str, settings: Settings) -> FollowUp:
    """The function, checked arguments and hand-off argument of a job named as callers name
    it. Raises ValueError (a 422 for the field that holds it)."""
    job_type = public_job_type(name)
    priority = {"_priority": job_type.priority}
    if not job_type.builtin:
        assert job_type.arguments is not None
        takes = argument in job_type.arguments.model_fields
        _validate_except(job_type, body, argument if takes else None)
        return FollowUp(job_type.name, dict(body) | priority, argument if takes else None)
    if job_type.arguments is not None:  # http: a model of its own
        arguments = job_type.validate(body).model_dump(mode="json")
        return FollowUp(job_type.name, arguments | priority)
    context = validation_context(settings, settings.mail_max_recipients)
    spec = EmailSpec.model_validate(body, context=context)
    email = spec.model_dump(mode="json", by_alias=True)
    message_id = new_message_id(spec.from_ or settings.mail_from)
    kwargs = {"email": email, "message_id": message_id} | priority
    return FollowUp(job_type.name, kwargs, BUILTIN_HAND_OFF.get(job_type.name))


def public_job_type(name: str) -> JobType:
    for job_type in job_types():
        if job_type.public_name == name and (not job_type.builtin or name in FOLLOWING_BUILTINS):
            return job_type
    raise ValueError(f"no job type {name!r} can follow a job (yours, or: email, http)")


def _validate_except(job_type: JobType, body: dict[str, Any], argument: str | None) -> None:
    """Check a user's job's fields now, all but the one filled when it runs."""
    try:
        job_type.validate(body)
    except ValidationError as exc:
        errors = [e for e in exc.errors() if not (argument and e["loc"][:1] == (argument,))]
        if errors:
            raise ValueError(f"{job_type.name}: {errors[0]['loc']}: {errors[0]['msg']}") from None


def cost_of(follow: FollowUp | None) -> tuple[int, int]:
    """What a follow-up, a callback or a batch's job and the follow-ups after it are charged:
    (rate-limit units: a job type's cost each, a URL callback nothing, as a `callback_url`
    costs nothing; messages: an email's recipients, to the hourly message quota)."""
    units = messages = 0
    while follow is not None:
        if follow.function != "deliver_webhook":
            job_type = get_job_type(follow.function)
            units += job_type.cost if job_type is not None else 1
        if follow.function == "send_email":
            email = follow.kwargs.get("email") or {}
            messages += sum(len(email.get(field) or ()) for field in ("to", "cc", "bcc"))
        follow = follow.then
    return units, messages
