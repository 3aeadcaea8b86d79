"""What both sides of the bench agree on: the project's venv and the Celery venv.

Import-free on purpose: the Celery venv has neither the project's packages nor its redis-py.
"""

from __future__ import annotations

PAGE_DELAY_S = 0.05  # every page of the bench site takes this long to answer
PAGE_PATH = "/page/{n}"
TASK_PATH = "/task/{n}"  # the http workload's endpoint: a signed POST, answered after 50 ms
HTTP_JOBS_SECRET = "bench-http-jobs-secret"  # what every engine signs the http workload with
MAIL_FROM = "asyncjobs@localhost"  # the project's default sender, used by Celery's task too
EMAIL_SUBJECT = "Benchmark message {n}"
EMAIL_TEXT = "Hello,\n\nthis is benchmark message {n}.\n\n-- \nasyncjobs bench\n"
EMAIL_HTML = "<p>Hello,</p><p>this is benchmark message <b>{n}</b>.</p>"
CELERY_TIMES_KEY = "bench:times"  # Celery tasks: hash job index -> "enqueued start finished"
CELERY_DOC_PREFIX = "bench:doc:"  # Celery scrape task: the page summary, as the project keeps
CELERY_SENT_PREFIX = "bench:sent:"  # Celery email task: a sent marker, as the project keeps


def recipient(n: int) -> str:
    return f"user{n}@example.com"


def page_url(site: str, n: int) -> str:
    return site.rstrip("/") + PAGE_PATH.format(n=n)


def task_url(site: str, n: int) -> str:
    return site.rstrip("/") + TASK_PATH.format(n=n)
