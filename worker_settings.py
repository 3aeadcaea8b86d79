"""Entry point of the worker: `arq worker_settings.WorkerSettings`.

Every option comes from environment variables through `app.settings.Settings`; see README.
"""

from app.logs import configure_logging
from app.settings import get_settings
from jobs.resilience import install
from jobs.worker import worker_options

configure_logging()
install()  # keep the worker alive through Redis restarts (see jobs/resilience.py)

WorkerSettings = type("WorkerSettings", (), worker_options(get_settings()))
