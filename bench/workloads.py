"""The three job workloads: their sizes per mode, deadlines, and the arq jobs they enqueue.

(Celery's equivalent arguments are built in bench/celery_enqueue.py, inside the Celery venv.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from asyncjobs.addresses import new_message_id
from bench.common import (
    EMAIL_HTML,
    EMAIL_SUBJECT,
    EMAIL_TEXT,
    MAIL_FROM,
    page_url,
    recipient,
    task_url,
)
from jobs.http.spec import HttpCall
from jobs.mail.email import EmailSpec

WorkloadName = Literal["scrape", "email", "noop", "user-noop", "user-get", "http"]


@dataclass(frozen=True)
class Workload:
    name: WorkloadName
    title: str
    full: int
    quick: int
    budget_per_job_s: float  # generous: the slowest engine needs well under this

    def size(self, quick: bool) -> int:
        return self.quick if quick else self.full

    def deadline_s(self, n: int) -> float:
        """How long an engine may take before it is reported as "timeout"."""
        return 30.0 + n * self.budget_per_job_s


WORKLOADS: dict[WorkloadName, Workload] = {
    "scrape": Workload(
        "scrape", "(a) scrape: HTTP GET of a 50 ms, 2 KB page + parse", 2000, 200, 0.05
    ),
    "email": Workload("email", "(b) email: one message to the SMTP sink", 5000, 300, 0.02),
    "noop": Workload("noop", "(c) no-op: jobs that return at once", 10_000, 1000, 0.01),
    "user-noop": Workload(
        "user-noop", "(e) a user's no-op job (`@job`, JOB_MODULES)", 10_000, 1000, 0.01
    ),
    "user-get": Workload(
        "user-get", "(f) a user's job doing one HTTP GET of a 50 ms page", 2000, 200, 0.05
    ),
    "http": Workload(
        "http",
        "(g) http job: a signed POST of a small JSON body to a 50 ms endpoint",
        2000,
        200,
        0.05,
    ),
}
# Workloads of a user's `@job` functions: a worker from before the registry has none.
USER_WORKLOADS = frozenset({"user-noop", "user-get"})
# Workloads whose job an older worker (asyncjobs@<commit>) may not have: skipped for it.
NEWER_WORKLOADS = USER_WORKLOADS | {"http"}
# Workloads that call the bench site: their latency-bound limit and its peak in flight.
SITE_WORKLOADS = frozenset({"scrape", "http"})


def arq_job(workload: WorkloadName, n: int, site: str) -> tuple[str, dict[str, Any]]:
    """Function name and keyword arguments of job `n`, exactly as the API would enqueue it."""
    if workload == "scrape":
        return "scrape", {"target": {"url": page_url(site, n)}}
    if workload == "email":
        spec = EmailSpec.model_validate(
            {
                "to": recipient(n),
                "subject": EMAIL_SUBJECT.format(n=n),
                "text": EMAIL_TEXT.format(n=n),
                "html": EMAIL_HTML.format(n=n),
            }
        )
        # without the defaults: a worker of an older commit (asyncjobs@<commit>) refuses fields
        # its EmailSpec does not have yet (attachments), and defaults are what it assumes
        email = spec.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        return "send_email", {"email": email, "message_id": new_message_id(MAIL_FROM)}
    if workload == "user-noop":
        return "user_noop", {}
    if workload == "user-get":
        return "user_get", {"url": page_url(site, n)}
    if workload == "http":  # as POST /jobs/http stores it
        call = HttpCall.model_validate({"url": task_url(site, n), "json": {"n": n}})
        return "http", call.model_dump(mode="json")
    return "noop", {}
