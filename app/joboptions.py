"""Options every `POST /jobs/*` takes beside its job's own fields: when the job runs
(`run_at` or `delay_seconds`), how urgent it is (`priority`), and where its end is reported
(`callback_url`)."""

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
    ValidationInfo,
    field_validator,
    model_validator,
)

from app.http import read_json_object
from app.state import SETTINGS
from asyncjobs.registry import Priority
from asyncjobs.settings import Settings
from jobs.engine.queue import CALLBACK_KWARG
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

    @model_validator(mode="after")
    def _one_time(self) -> JobOptions:
        if self.run_at is not None and self.delay_seconds is not None:
            raise ValueError("give at most one of 'run_at' or 'delay_seconds'")
        return self

    def delay_ms(self) -> int:
        if self.run_at is not None:
            return max(0, int((self.run_at - datetime.now(UTC)).total_seconds() * 1000))
        return int((self.delay_seconds or 0) * 1000)

    def enqueue_kwargs(self, default_priority: Priority | None = None) -> dict[str, Any]:
        """The enqueue options (`_defer_by`, `_priority`) and the callback the runner reads.
        Without a priority here, the job type's own applies (app.actions.enqueue)."""
        kwargs: dict[str, Any] = {}
        if priority := self.priority or default_priority:
            kwargs["_priority"] = priority
        if delay_ms := self.delay_ms():
            kwargs["_defer_by"] = timedelta(milliseconds=delay_ms)  # a number would be seconds
        if self.callback_url is not None:
            kwargs[CALLBACK_KWARG] = str(self.callback_url)
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
