"""Logging for the web process, the worker and the dev launcher.

JSON lines by default (one object per line: time, level, logger, message and any `extra`
fields such as job_id, function, try, duration_ms, outcome), so a log pipeline can index them;
`LOG_FORMAT=text` for people (the dev launcher uses it).

With tracing on (asyncjobs/tracing.py), a line written inside a traced request or job carries
`trace_id` and `span_id`: fields of the JSON object, `trace_id=… span_id=…` at the end of a
text line.
"""

from __future__ import annotations

import logging
import logging.config
import os
from datetime import UTC, datetime
from typing import Any

from asyncjobs.speedups import dumps

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return dumps(entry)


class TextFormatter(logging.Formatter):
    """The text format, with the trace's ids when the record has them."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace_id = getattr(record, "trace_id", None)
        if trace_id is None:
            return line
        return f"{line} trace_id={trace_id} span_id={getattr(record, 'span_id', '')}"


def log_config(verbose: bool = False) -> dict[str, Any]:
    """A `logging.config.dictConfig` dict; also handed to arq's CLI (see worker_settings.py)."""
    level = "DEBUG" if verbose else os.environ.get("LOG_LEVEL", "INFO").upper()
    text = os.environ.get("LOG_FORMAT", "json").lower() == "text"
    formatter: dict[str, Any] = (
        {"()": TextFormatter, "format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s"}
        if text
        else {"()": JsonFormatter}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "handlers": {"main": {"class": "logging.StreamHandler", "formatter": "main"}},
        "root": {"handlers": ["main"], "level": level},
        "loggers": {
            "arq": {"handlers": [], "propagate": True, "level": level},
            # aiosmtpd logs every SMTP command at INFO: too chatty
            "mail.log": {"level": "WARNING"},
        },
    }


def configure_logging(verbose: bool = False) -> None:
    logging.config.dictConfig(log_config(verbose))
