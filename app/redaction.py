"""Secrets kept out of what any reader sees: job arguments shown by the API and the dashboard."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SECRET_WORDS = ("password", "secret", "token", "key", "authorization")
REDACTED = "***"


def redact(value: Any) -> Any:
    """A copy with the value of every key that sounds secret replaced, at any depth."""
    if isinstance(value, Mapping):
        return {k: REDACTED if _sounds_secret(k) else redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value


def _sounds_secret(name: object) -> bool:
    lowered = str(name).lower()
    return any(word in lowered for word in SECRET_WORDS)
