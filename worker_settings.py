"""Entry point of the worker: `arq worker_settings.WorkerSettings`.

Every option comes from environment variables through `asyncjobs.settings.Settings`; see
docs/operations.md.
"""

import arq.cli

from asyncjobs.logs import log_config
from asyncjobs.registry import JobRegistrationError
from asyncjobs.settings import get_settings
from asyncjobs.speedups import install_event_loop
from jobs.engine.worker import EngineWorker, let_settings_choose_worker_class
from jobs.worker import worker_options

# arq's CLI configures logging right after importing this module: give it our config (JSON
# lines, or text with LOG_FORMAT=text) instead of its own.
arq.cli.default_log_config = log_config  # type: ignore[attr-defined]
# uvloop (unless ASYNCJOBS_SPEEDUPS says otherwise), set before arq's Worker makes its loop.
install_event_loop()
# arq's CLI builds `worker_class` for these settings (leases, wake-ups, Redis restarts:
# jobs/engine/worker.py) and arq's own Worker for any other.
let_settings_choose_worker_class()

try:  # the job types, users' own included (JOB_MODULES): one line if one cannot be loaded
    _options = worker_options(get_settings())
except JobRegistrationError as exc:
    raise SystemExit(f"error: {exc}") from None

WorkerSettings = type("WorkerSettings", (), {**_options, "worker_class": EngineWorker})
