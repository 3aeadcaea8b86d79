"""`python -m arq bench.asyncjobs_settings.WorkerSettings`: the production worker plus a no-op job.

It imports worker_settings.py itself, so the bench's worker is set up exactly as production's
(logging handed to arq's CLI, the `EngineWorker` class, `jobs.worker.worker_options` from
the environment) and stays so when that entry point changes; the one addition is `noop`.
"""

from __future__ import annotations

from typing import cast

from arq.typing import WorkerCoroutine
from arq.worker import func

import worker_settings
from bench.noop import noop

_options = {k: v for k, v in vars(worker_settings.WorkerSettings).items() if not k.startswith("__")}
_options["functions"] = [*_options["functions"], func(cast(WorkerCoroutine, noop), name="noop")]
WorkerSettings = type("WorkerSettings", (), _options)
