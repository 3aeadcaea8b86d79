"""Plain arq baselines: the project's job functions and hooks in an otherwise default arq Worker.

No `worker_class` (so arq's own poll loop and in-progress marks), no cron jobs,
arq's own Redis settings from `REDIS_URL`. Logging is handed to arq's CLI as worker_settings.py
does, so every arq engine writes the same log lines per job.

- `DefaultSettings`: arq 0.28's defaults (max_jobs=10, poll_delay=0.5).
- `TunedSettings`: max_jobs=500, poll_delay=0.01, the fair baseline.

Both run on the same stack as the project's worker (asyncjobs/speedups.py: uvloop, hiredis, unless
ASYNCJOBS_SPEEDUPS says otherwise), so a ratio between them shows the engine, not the loop.
"""

from __future__ import annotations

from typing import Any, cast

import arq.cli
from arq.connections import ArqRedis, RedisSettings
from arq.typing import WorkerCoroutine
from arq.worker import func
from redis.asyncio import ConnectionPool

from asyncjobs.logs import log_config
from asyncjobs.settings import get_settings
from asyncjobs.speedups import install_event_loop, redis_pool_options
from bench.noop import noop
from bench.userjobs import ARQ_FUNCTIONS, USER_JOBS
from jobs.registered import arq_functions
from jobs.worker import shutdown, startup

arq.cli.default_log_config = log_config  # type: ignore[attr-defined]
install_event_loop()

_settings = get_settings()
_base: dict[str, Any] = {
    "functions": [
        *(f for f in arq_functions(_settings) if f.name not in USER_JOBS),
        func(cast(WorkerCoroutine, noop), name="noop"),
        *ARQ_FUNCTIONS,  # a user's jobs, as plain arq functions
    ],
    "on_startup": startup,
    "on_shutdown": shutdown,
    "redis_settings": RedisSettings.from_dsn(_settings.redis_url),
    # arq's own pool, but with the parser ASYNCJOBS_SPEEDUPS chose (redis-py takes hiredis
    # whenever it is installed)
    "redis_pool": ArqRedis(
        ConnectionPool.from_url(_settings.redis_url, **redis_pool_options(_settings.redis_url))
    ),
}
DefaultSettings = type("DefaultSettings", (), _base)
TunedSettings = type("TunedSettings", (), {**_base, "max_jobs": 500, "poll_delay": 0.01})
