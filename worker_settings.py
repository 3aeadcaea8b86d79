"""Entry point of the worker: `arq worker_settings.WorkerSettings`.

Every option comes from environment variables through `asyncjobs.settings.Settings`; see
docs/operations.md.
"""

from asyncjobs.arqcompat import WORKER_CLASS, take_over_arq_cli
from asyncjobs.logs import log_config
from asyncjobs.registry import JobRegistrationError
from asyncjobs.settings import get_settings
from asyncjobs.speedups import install_event_loop
from jobs.engine.worker import EngineWorker
from jobs.worker import worker_options

# Only when arq's CLI is importing this module (`arq worker_settings.WorkerSettings`): it builds
# `worker_class` for these settings (leases, wake-ups, Redis restarts: jobs/engine/worker.py),
# logs with our config (JSON lines, or text with LOG_FORMAT=text) and runs on uvloop (unless
# ASYNCJOBS_SPEEDUPS says otherwise). Any other importer (tests, a script) gets no change at all.
take_over_arq_cli(log_config=log_config, prepare=install_event_loop)

try:  # the job types, users' own included (JOB_MODULES): one line if one cannot be loaded
    _options = worker_options(get_settings())
except JobRegistrationError as exc:
    raise SystemExit(f"error: {exc}") from None

WorkerSettings = type("WorkerSettings", (), {**_options, WORKER_CLASS: EngineWorker})
