"""Entry point of the worker: `arq worker_settings.WorkerSettings`.

Every option comes from environment variables through `app.settings.Settings`; see README.
"""

import arq.cli

from app.logs import log_config
from app.settings import get_settings
from jobs.resilience import install
from jobs.worker import worker_options

# arq's CLI configures logging right after importing this module: give it our config (JSON
# lines, or text with LOG_FORMAT=text) instead of its own.
arq.cli.default_log_config = log_config  # type: ignore[attr-defined]
install()  # leases, wake-ups, Redis restarts: jobs/resilience.py

WorkerSettings = type("WorkerSettings", (), worker_options(get_settings()))
