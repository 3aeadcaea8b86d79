"""Logging setup shared by the web process, the worker and the dev launcher."""

import logging
import os


def configure_logging(level: str | None = None) -> None:
    logging.basicConfig(
        level=(level or os.environ.get("LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # arq's CLI gives its logger a handler of its own; without this every line prints twice.
    logging.getLogger("arq").propagate = False
    # aiosmtpd logs every SMTP command at INFO: too chatty for a dev console.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
