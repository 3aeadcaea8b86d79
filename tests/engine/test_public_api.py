"""What users import is `asyncjobs`: its names are a promise, changed on purpose only."""

from __future__ import annotations

import subprocess
import sys

import asyncjobs

PUBLIC = {
    "AsyncJobsError", "Client", "ClientRequestError", "JobContext", "JobError", "JobFailed",
    "JobRegistrationError", "JobState", "JobStatus", "JobType", "NotFound", "PermanentJobError",
    "RateLimited", "RetryPolicy", "ServerError", "ServiceUnavailable", "SyncClient",
    "TransientJobError", "ValidationFailed", "WaitTimeout", "__version__", "job",
}  # fmt: skip


def test_the_public_names_are_exactly_these() -> None:
    assert set(asyncjobs.__all__) == PUBLIC
    assert all(getattr(asyncjobs, name, None) is not None for name in PUBLIC)


def test_importing_it_loads_neither_the_web_nor_the_worker_side() -> None:
    """A web project imports `asyncjobs` for the client and `@job`: not our app or jobs."""
    code = "import sys, asyncjobs; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "'app'" not in loaded and "'jobs'" not in loaded, loaded
