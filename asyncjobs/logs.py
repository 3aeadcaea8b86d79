"""Logging for the web process, the worker and the dev launcher.

JSON lines by default (one object per line: time, level, logger, message and any `extra`
fields such as job_id, function, try, duration_ms, outcome), so a log pipeline can index them;
`LOG_FORMAT=text` for people (the dev launcher uses it).
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


def log_config(verbose: bool = False) -> dict[str, Any]:
    """A `logging.config.dictConfig` dict; also handed to arq's CLI (see worker_settings.py)."""
    level = "DEBUG" if verbose else os.environ.get("LOG_LEVEL", "INFO").upper()
    text = os.environ.get("LOG_FORMAT", "json").lower() == "text"
    formatter: dict[str, Any] = (
        {"format": "%(asctime)s %(levelname)-7s %(name)s: %(message)s"}
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
