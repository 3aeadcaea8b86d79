"""Small conversions of values read back from Redis, and the current time as stored."""

from datetime import UTC, datetime


def as_text(value: bytes | str) -> str:
    """Redis answers bytes unless the client decodes; our keys and fields are UTF-8 text."""
    return value.decode() if isinstance(value, bytes) else value


def as_utc(moment: datetime) -> datetime:
    """Stored times are UTC; a naive one is read as UTC rather than as local time."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def now_utc() -> datetime:
    return datetime.now(UTC)
