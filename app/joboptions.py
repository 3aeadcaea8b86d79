"""Options every `POST /jobs/*` takes beside its job's own fields: when the job runs
(`run_at` or `delay_seconds`), how urgent it is (`priority`), where its end is reported
(`callback_url`), and whether an enqueue with the same key answers the job already there
(`unique_key`, `unique_window_seconds`: jobs/engine/unique.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from pydantic import (
    AnyHttpUrl,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from app.chains import MAX_AFTER, ThenSpec, dependencies_of
from app.http import read_json_object
from app.state import SETTINGS
from asyncjobs.registry import Priority
from asyncjobs.settings import Settings
from jobs.engine.dependencies import DEPENDENCIES_KWARG, Dependencies
from jobs.engine.queue import CALLBACK_KWARG, UNIQUE_KWARG
from jobs.engine.unique import DEFAULT_WINDOW_S, Unique
from jobs.engine.unique import MAX_KEY_LENGTH as MAX_UNIQUE_KEY_LENGTH
from jobs.scrape.page import MAX_URL_LENGTH

# A run_at this far in the past is taken as "now" (clocks differ); further back is a mistake.
PAST_TOLERANCE_S = 60


class JobOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_at: AwareDatetime | None = Field(None, description="ISO time with zone: run then")
    delay_seconds: float | None = Field(None, ge=0, allow_inf_nan=False)
    priority: Priority | None = Field(
        None, description="transactional (ahead) or bulk; each endpoint has its default"
    )
    callback_url: AnyHttpUrl | None = Field(None, max_length=MAX_URL_LENGTH)
    unique_key: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_UNIQUE_KEY_LENGTH,
        description="while a job of this type enqueued by the same API key with this key is "
        "queued, deferred, running or waiting for a retry (within its window), answer that "
        "job (`existing: true`) instead of enqueueing another",
    )
    after: list[str] | None = Field(
        None,
        min_length=1,
        max_length=MAX_AFTER,
        description="job ids: this job waits (status `waiting`) until all have completed; if "
        "one fails for good it is cancelled, unless `allow_failure`",
    )
    allow_failure: bool = Field(False, description="with `after`: run even if one failed")
    then: ThenSpec | None = Field(
        None, description="a follow-up run once this job has completed, with its result"
    )
    # the engine's form of after/then, checked with the settings (app/chains.py)
    _dependencies: Dependencies | None = PrivateAttr(None)
    unique_window_seconds: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description=f"how long `unique_key` holds at most (default {DEFAULT_WINDOW_S:g}, at "
        "most UNIQUE_WINDOW_MAX); it is free as soon as its job ends",
    )

    @field_validator("delay_seconds")
    @classmethod
    def _not_too_far(cls, value: float | None, info: ValidationInfo) -> float | None:
        limit = _settings(info).max_delay_seconds
        if value is not None and value > limit:
            raise ValueError(f"at most {limit:g} seconds ahead (MAX_DELAY_SECONDS)")
        return value

    @field_validator("run_at")
    @classmethod
    def _in_the_window(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        if value is None:
            return None
        ahead = (value - datetime.now(UTC)).total_seconds()
        limit = _settings(info).max_delay_seconds
        if ahead < -PAST_TOLERANCE_S:
            raise ValueError("is in the past")
        if ahead > limit:
            raise ValueError(f"is more than {limit:g} seconds ahead (MAX_DELAY_SECONDS)")
        return value

    @field_validator("callback_url")
    @classmethod
    def _signed(cls, value: AnyHttpUrl | None, info: ValidationInfo) -> AnyHttpUrl | None:
        if value is not None and _settings(info).webhook_secret is None:
            raise ValueError("this server has no WEBHOOK_SECRET to sign callbacks with")
        return value

    @field_validator("unique_window_seconds")
    @classmethod
    def _window_bounded(cls, value: float | None, info: ValidationInfo) -> float | None:
        limit = _settings(info).unique_window_max
        if value is not None and value > limit:
            raise ValueError(f"at most {limit:g} seconds (UNIQUE_WINDOW_MAX)")
        return value

    @model_validator(mode="after")
    def _one_time(self, info: ValidationInfo) -> JobOptions:
        if self.run_at is not None and self.delay_seconds is not None:
            raise ValueError("give at most one of 'run_at' or 'delay_seconds'")
        if self.allow_failure and not self.after:
            raise ValueError("'allow_failure' goes with 'after'")
        settings = _settings(info)
        self._dependencies = dependencies_of(self.after, self.allow_failure, self.then, settings)
        if self.unique_window_seconds is not None and self.unique_key is None:
            raise ValueError("'unique_window_seconds' goes with a 'unique_key'")
        if self.unique_key is not None and self.unique_window_seconds is None:
            self.unique_window_seconds = min(DEFAULT_WINDOW_S, _settings(info).unique_window_max)
        return self

    def unique(self) -> Unique | None:
        """The enqueue's unique key (scoped to the job's owner), if it has one."""
        if self.unique_key is None or self.unique_window_seconds is None:
            return None
        return Unique(self.unique_key, self.unique_window_seconds)

    def dependencies(self) -> Dependencies | None:
        """The engine's form of `after`, `allow_failure` and `then` (None: none given)."""
        return self._dependencies

    def delay_ms(self) -> int:
        if self.run_at is not None:
            return max(0, int((self.run_at - datetime.now(UTC)).total_seconds() * 1000))
        return int((self.delay_seconds or 0) * 1000)

    def enqueue_kwargs(self, default_priority: Priority | None = None) -> dict[str, Any]:
        """The enqueue options (`_defer_by`, `_priority`, `_unique`) and the callback the
        runner reads. Without a priority here, the job type's own applies
        (app.actions.enqueue)."""
        kwargs: dict[str, Any] = {}
        if priority := self.priority or default_priority:
            kwargs["_priority"] = priority
        if delay_ms := self.delay_ms():
            kwargs["_defer_by"] = timedelta(milliseconds=delay_ms)  # a number would be seconds
        if self.callback_url is not None:
            kwargs[CALLBACK_KWARG] = str(self.callback_url)
        if (unique := self.unique()) is not None:
            kwargs[UNIQUE_KWARG] = unique
        if self._dependencies is not None:  # app.actions.enqueue hands it to the engine
            kwargs[DEPENDENCIES_KWARG] = self._dependencies
        return kwargs


def _settings(info: ValidationInfo) -> Settings:
    settings = (info.context or {}).get("settings")
    if not isinstance(settings, Settings):
        raise TypeError("JobOptions is validated with context={'settings': Settings}")
    return settings


OPTION_NAMES = frozenset(JobOptions.model_fields)


def split_options(body: dict[str, Any], settings: Settings) -> tuple[JobOptions, dict[str, Any]]:
    """The options in a request body, validated, and the rest of the body (the job's fields)."""
    options = {name: body[name] for name in OPTION_NAMES if name in body}
    rest = {name: value for name, value in body.items() if name not in OPTION_NAMES}
    return JobOptions.model_validate(options, context={"settings": settings}), rest


async def read_job_request(request: web.Request) -> tuple[JobOptions, dict[str, Any]]:
    """A `POST /jobs/*` body: its job options, validated, and the job's own fields."""
    return split_options(await read_json_object(request), request.app[SETTINGS])
