"""A job's state, as `GET /jobs/{job_id}` tells it: one enum for the API's schemas and its
OpenAPI document, the dashboard, the actions on jobs and the client.

A `StrEnum`: a state is its own string ("complete" == JobState.COMPLETE), and JSON shows it
as that string.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ACTIVE", "FINISHED", "JobState"]


class JobState(StrEnum):
    WAITING = "waiting"  # waits for other jobs to end (`after`, `then`, a batch's callback)
    QUEUED = "queued"  # due, waiting for a worker
    DEFERRED = "deferred"  # due later: run_at, delay_seconds or a retry's backoff
    IN_PROGRESS = "in_progress"  # a worker runs it (a newsletter: also while its mail is sent)
    COMPLETE = "complete"
    FAILED = "failed"
    ABORTED = "aborted"
    NOT_FOUND = "not_found"  # no such job, or its result has expired


# The job exists and has not ended: it can still be aborted.
ACTIVE = frozenset({JobState.WAITING, JobState.QUEUED, JobState.DEFERRED, JobState.IN_PROGRESS})
# The job has ended; its result (or error) is kept for a while.
FINISHED = frozenset({JobState.COMPLETE, JobState.FAILED, JobState.ABORTED})
