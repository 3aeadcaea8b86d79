"""Every built-in job type, imported so each registers itself (asyncjobs.registry): the worker
and the API import this module before the modules JOB_MODULES names, so a user's job cannot
take a built-in's name."""

from jobs.housekeeping import daily_cleanup, daily_report, export, report
from jobs.http.job import http
from jobs.images import process_image
from jobs.mail import send_email, send_newsletter
from jobs.scrape import scrape, scrape_source
from jobs.webhooks import deliver_webhook

__all__ = [
    "daily_cleanup",
    "daily_report",
    "deliver_webhook",
    "export",
    "http",
    "process_image",
    "report",
    "scrape",
    "scrape_source",
    "send_email",
    "send_newsletter",
]
