"""The registry of job types: every job, built-in or a user's own, declared once with `@job`.

A declaration says everything the service must know about a job: its name, its arguments (a
pydantic model made from the signature, or the one model parameter it takes), its result type,
its retry policy, timeout, default priority, what one call costs against the caller's rate
limit, and whether it can be scheduled. The worker's function list, the API's routes and
OpenAPI operations, schedules, `GET /jobs/types` and the dashboard read it from here.

    from asyncjobs import JobContext, job

    @job(tries=5, transient=(ConnectionError,))
    async def generate_invoice(ctx: JobContext, order_id: int) -> str:
        ...
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar, overload

from pydantic import BaseModel, ConfigDict, TypeAdapter, create_model

from asyncjobs.settings import Settings

Priority = Literal["transactional", "bulk"]
PRIORITIES: tuple[Priority, ...] = ("transactional", "bulk")
# The built-ins retry by their family's settings (EMAIL_MAX_TRIES, SCRAPE_MAX_TRIES, ...).
Family = Literal["email", "scrape", "maintenance", "webhook", "http"]
JobFunction = Callable[..., Awaitable[Any]]
F = TypeVar("F", bound=JobFunction)

# Set on a declared function: its job name, which `@job(name=...)` may make differ from its own.
JOB_NAME_ATTRIBUTE = "asyncjobs_job_name"
# A job name is a route segment, a metric label and an arq function name at once.
NAME_PATTERN = r"[a-z][a-z0-9_]{0,62}"


class JobRegistrationError(Exception):
    """A job cannot be declared or loaded: a bad name, a clash, a module that fails to import."""


@dataclass(frozen=True)
class RetryPolicy:
    """How a job retries transient failures: backoff from `base_delay` to `max_delay` seconds,
    at most `max_tries` tries, and no new try `lifetime` seconds after the enqueue."""

    max_tries: int = 3
    base_delay: float = 2.0
    max_delay: float = 300.0
    lifetime: float | None = None

    def expired(self, enqueue_time: datetime | None, now: datetime) -> bool:
        if self.lifetime is None or enqueue_time is None:
            return False
        return (now - enqueue_time).total_seconds() >= self.lifetime


def family_policy(settings: Settings, family: Family) -> RetryPolicy:
    if family == "email":
        return RetryPolicy(
            settings.email_max_tries,
            settings.email_retry_base_delay,
            settings.email_retry_max_delay,
            settings.email_retry_lifetime,
        )
    tries = {
        "scrape": settings.scrape_max_tries,
        "webhook": settings.webhook_max_tries,
        "http": settings.http_jobs_max_tries,
    }.get(family, settings.maintenance_max_tries)
    return RetryPolicy(tries, settings.retry_base_delay, settings.retry_max_delay)


def policy_of(retry: RetryPolicy | Family, settings: Settings) -> RetryPolicy:
    """A declaration's policy: its own, or its built-in family's from the settings."""
    return family_policy(settings, retry) if isinstance(retry, str) else retry


@dataclass(frozen=True)
class JobType:
    """One registered job type."""

    name: str
    function: JobFunction
    retry: RetryPolicy | Family
    priority: Priority = "bulk"
    cost: int = 1
    schedulable: bool = True
    timeout: float | None = None  # seconds; None: JOB_TIMEOUT
    transient: tuple[type[BaseException], ...] = ()  # retried by the policy
    permanent: tuple[type[BaseException], ...] = ()  # dead-lettered at once
    builtin: bool = False
    # A built-in's own endpoint, `POST /jobs/<endpoint>`, and its name in a schedule's `type`
    # (a user's job is both by its name).
    endpoint: str | None = None
    # A user's job: its arguments' model, its result type, and whether it takes the context.
    arguments: type[BaseModel] | None = None
    result: Any = None
    takes_context: bool = True
    model_parameter: str | None = None  # the one model parameter the function takes, if so
    summary: str = ""
    # A summary of a call for lists (the dashboard): which argument fields to show.
    shown: tuple[str, ...] = field(default=())

    def policy(self, settings: Settings) -> RetryPolicy:
        return policy_of(self.retry, settings)

    @property
    def public_name(self) -> str | None:
        """How callers name it (`POST /jobs/<it>`, a schedule's `type`): a built-in by its
        endpoint, none for those only the worker enqueues; a user's job by its name."""
        return self.endpoint if self.builtin else self.name

    def validate(self, arguments: dict[str, Any]) -> BaseModel:
        """The call's arguments checked against the model (pydantic's ValidationError if not)."""
        if self.arguments is None:
            raise JobRegistrationError(f"job {self.name!r} is called through its own endpoint")
        return self.arguments.model_validate(arguments)

    def call_arguments(self, model: BaseModel) -> dict[str, Any]:
        """The keyword arguments the function itself is called with."""
        if self.model_parameter is not None:
            return {self.model_parameter: model}
        return {name: getattr(model, name) for name in type(model).model_fields}

    def result_schema(self) -> dict[str, Any]:
        if self.result is None or self.result is inspect.Signature.empty:
            return {}
        try:
            return TypeAdapter(self.result).json_schema()
        except Exception:  # a type pydantic cannot describe: documented as any value
            return {}


_REGISTRY: dict[str, JobType] = {}


def register(job_type: JobType) -> JobType:
    """Add a job type. A second declaration of the same function (a module imported again) is
    taken as the same job; any other clash is an error naming both."""
    existing = _REGISTRY.get(job_type.name)
    if existing is not None and _origin(existing.function) != _origin(job_type.function):
        kind = "the built-in job" if existing.builtin else "the job"
        raise JobRegistrationError(
            f"job name {job_type.name!r} of {_origin(job_type.function)} clashes with "
            f"{kind} {_origin(existing.function)}"
        )
    _REGISTRY[job_type.name] = job_type
    return job_type


def unregister(name: str) -> None:
    """Forget a job type (tests that declare jobs of their own)."""
    _REGISTRY.pop(name, None)


def _origin(function: JobFunction) -> str:
    inner = inspect.unwrap(function)
    return f"{inner.__module__}.{inner.__qualname__}"


def get_job_type(name: str) -> JobType | None:
    return _REGISTRY.get(name)


def job_types() -> list[JobType]:
    """Every registered job type, built-ins first, then by name."""
    return sorted(_REGISTRY.values(), key=lambda t: (not t.builtin, t.name))


def user_job_types() -> list[JobType]:
    return [t for t in job_types() if not t.builtin]


@overload
def job(function: F, /) -> F: ...


@overload
def job(
    function: None = None,
    /,
    *,
    name: str | None = None,
    tries: int = 3,
    backoff: tuple[float, float] = (2.0, 300.0),
    lifetime: float | None = None,
    transient: Iterable[type[BaseException]] = (),
    permanent: Iterable[type[BaseException]] = (),
    timeout: float | None = None,
    priority: Priority = "bulk",
    cost: int = 1,
    schedulable: bool = True,
    shown: Iterable[str] = (),
) -> Callable[[F], F]: ...


def job(
    function: F | None = None,
    /,
    *,
    name: str | None = None,
    tries: int = 3,
    backoff: tuple[float, float] = (2.0, 300.0),
    lifetime: float | None = None,
    transient: Iterable[type[BaseException]] = (),
    permanent: Iterable[type[BaseException]] = (),
    timeout: float | None = None,
    priority: Priority = "bulk",
    cost: int = 1,
    schedulable: bool = True,
    shown: Iterable[str] = (),
) -> F | Callable[[F], F]:
    """Declare an async function as a job type (usable bare, `@job`, or with options).

    - `tries`, `backoff` (first and largest delay, seconds) and `lifetime` (seconds after the
      enqueue with no new try): the retry policy for errors listed in `transient` and for
      `asyncjobs.TransientJobError`;
    - `permanent`: errors dead-lettered at once (as `asyncjobs.PermanentJobError` is); any
      other exception is a bug, dead-lettered with its traceback in the log;
    - `timeout` (default JOB_TIMEOUT), `priority` ("transactional" or "bulk"), `cost` (units
      of the caller's rate limit per call), `schedulable`, `shown` (argument fields the
      dashboard lists a call by).

    The function takes the context first (`ctx: JobContext`, optional) and then either plain
    keyword arguments, made into a pydantic model, or one pydantic model parameter."""

    def declare(fn: F) -> F:
        job_name = name or fn.__name__
        declared: Any = fn  # not narrowed by the check below: `fn` keeps its own type
        if not inspect.iscoroutinefunction(declared):
            raise JobRegistrationError(f"job {job_name!r} must be an `async def` function")
        _check_name(job_name)
        if tries < 1 or cost < 0 or backoff[0] <= 0 or backoff[1] < backoff[0]:
            raise JobRegistrationError(
                f"job {job_name!r}: tries >= 1, cost >= 0, 0 < backoff[0] <= backoff[1]"
            )
        model, model_parameter, takes_context, result = _arguments_of(job_name, fn)
        register(
            JobType(
                name=job_name,
                function=fn,
                retry=RetryPolicy(tries, backoff[0], backoff[1], lifetime),
                priority=priority,
                cost=cost,
                schedulable=schedulable,
                timeout=timeout,
                transient=tuple(transient),
                permanent=tuple(permanent),
                arguments=model,
                result=result,
                takes_context=takes_context,
                model_parameter=model_parameter,
                summary=(inspect.getdoc(fn) or "").split("\n\n")[0],
                shown=tuple(shown),
            )
        )
        setattr(fn, JOB_NAME_ATTRIBUTE, job_name)  # what the client enqueues it by
        return fn

    return declare(function) if function is not None else declare


def _check_name(name: str) -> None:
    if not re.fullmatch(NAME_PATTERN, name):
        raise JobRegistrationError(
            f"job name {name!r} must be lowercase letters, digits and _ (start with a letter, "
            "at most 63)"
        )


def _arguments_of(name: str, fn: JobFunction) -> tuple[type[BaseModel], str | None, bool, Any]:
    """(arguments model, the model parameter's name if it takes one, takes the context, result
    type) from the function's signature."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:
        raise JobRegistrationError(f"job {name!r}: its annotations do not resolve: {exc}") from exc
    parameters = list(inspect.signature(fn).parameters.values())
    takes_context = bool(parameters) and (
        parameters[0].name == "ctx" or _is_context(hints.get(parameters[0].name))
    )
    if takes_context:
        parameters = parameters[1:]
    for p in parameters:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise JobRegistrationError(
                f"job {name!r}: parameter {p.name!r} must be a plain keyword parameter"
            )
    result = hints.get("return")
    if len(parameters) == 1:
        only = hints.get(parameters[0].name)
        if isinstance(only, type) and issubclass(only, BaseModel):
            return only, parameters[0].name, takes_context, result
    fields: dict[str, Any] = {}
    for p in parameters:
        annotation = hints.get(p.name, Any)
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (annotation, default)
    model = create_model(
        f"{_camel(name)}Arguments", __config__=ConfigDict(extra="forbid"), **fields
    )
    return model, None, takes_context, result


def _is_context(annotation: Any) -> bool:
    return getattr(annotation, "__name__", None) == "JobContext"


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def load_job_modules(names: Iterable[str]) -> list[JobType]:
    """Import the modules JOB_MODULES names (their `@job` functions register themselves); the
    user job types. Raises JobRegistrationError with one line for what went wrong.

    The current directory is searched last, as `arq` does, so a project's own `app/` or
    `core/` cannot shadow this service's packages."""
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for module in names:
        try:
            importlib.import_module(module)
        except JobRegistrationError:
            raise
        except Exception as exc:
            raise JobRegistrationError(
                f"JOB_MODULES: module {module!r} failed to import: {type(exc).__name__}: {exc}"
            ) from exc
    return user_job_types()
