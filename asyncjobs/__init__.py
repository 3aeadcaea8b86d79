"""asyncjobs: what a project imports to declare its own jobs and to call the service.

    from asyncjobs import JobContext, TransientJobError, job

    @job(tries=5, transient=(ConnectionError,))
    async def generate_invoice(ctx: JobContext, order_id: int) -> str:
        ...

and from a web handler, `await Client(url, key).enqueue(generate_invoice, order_id=42)`
(`SyncClient` in a sync view). The package is also the layer the web side (app/) and the
worker side (jobs/) share: settings, Redis connections, the name of every Redis key, the job
registry. Nothing here imports app/ or jobs/.
"""

from asyncjobs.client import (
    AsyncJobsError,
    Client,
    ClientRequestError,
    JobFailed,
    JobStatus,
    NotFound,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    SyncClient,
    ValidationFailed,
    WaitTimeout,
)
from asyncjobs.context import JobContext
from asyncjobs.errors import JobError, PermanentJobError, TransientJobError
from asyncjobs.jobstate import JobState
from asyncjobs.registry import JobRegistrationError, JobType, RetryPolicy, job
from asyncjobs.version import __version__

__all__ = [
    "AsyncJobsError",
    "Client",
    "ClientRequestError",
    "JobContext",
    "JobError",
    "JobFailed",
    "JobRegistrationError",
    "JobState",
    "JobStatus",
    "JobType",
    "NotFound",
    "PermanentJobError",
    "RateLimited",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailable",
    "SyncClient",
    "TransientJobError",
    "ValidationFailed",
    "WaitTimeout",
    "__version__",
    "job",
]
