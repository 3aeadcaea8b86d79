"""The one seam between this project and arq: everything it uses beyond arq's documented API.

arq documents `Worker`, `func`, `cron`, `create_pool`, `ArqRedis`, `Job` and its (de)serialisers;
everything else this project relies on (its Redis key layout, its time helpers, and the private
parts of its Worker that the engine replaces) is named here, and tests/engine/test_arqcompat.py
checks each assumption against the installed arq, so that an upgrade fails there first with a
message saying which assumption broke.
"""

from __future__ import annotations

# arq's key layout: the engine's Lua scripts, the status reads and the dashboard use arq's keys
# so that arq's own `enqueue_job` and `Job` keep working against the same queue.
from arq.constants import (
    abort_jobs_ss,
    default_queue_name,
    expires_extra_ms,
    health_check_key_suffix,
    in_progress_key_prefix,
    job_key_prefix,
    keep_cronjob_progress,
    result_key_prefix,
    retry_key_prefix,
)

# arq's clock helpers: job records hold milliseconds since the epoch, read as arq reads them.
from arq.utils import ms_to_datetime, timestamp_ms, to_ms

__all__ = [
    "abort_jobs_ss",
    "default_queue_name",
    "expires_extra_ms",
    "health_check_key_suffix",
    "in_progress_key_prefix",
    "job_key_prefix",
    "keep_cronjob_progress",
    "ms_to_datetime",
    "result_key_prefix",
    "retry_key_prefix",
    "timestamp_ms",
    "to_ms",
]
