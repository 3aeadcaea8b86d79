"""Secrets kept out of what any reader sees: job arguments shown by the API and the dashboard.

A value is hidden when its key sounds secret, or when the value itself looks like a
credential whatever its key is called (`X-Auth: Bearer ...`, `Basic ...`, a JWT, a URL with a
password in it)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# "cookie": an HTTP job's `headers.Cookie` carries a session as surely as Authorization does
SECRET_WORDS = ("password", "secret", "token", "key", "authorization", "cookie")
REDACTED = "***"
# Credentials by their shape: an HTTP auth scheme and its token, a JWT, user:password@ in a URL
SECRET_SHAPES = re.compile(
    r"^\s*(?:bearer|basic|digest|token|apikey)\s+\S{8,}"
    r"|^ey[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+$"
    r"|^[a-z][a-z0-9+.-]*://[^/@:\s]+:[^/@\s]+@",
    re.IGNORECASE,
)


def redact(value: Any) -> Any:
    """A copy with the value of every key that sounds secret, and every string that looks
    like a credential, replaced, at any depth."""
    if isinstance(value, Mapping):
        return {k: REDACTED if _sounds_secret(k) else redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    if isinstance(value, str) and SECRET_SHAPES.match(value):
        return REDACTED
    return value


def _sounds_secret(name: object) -> bool:
    lowered = str(name).lower()
    return any(word in lowered for word in SECRET_WORDS)
