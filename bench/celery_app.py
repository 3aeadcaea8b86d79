"""The Celery baseline: the bench's three workloads as synchronous Celery tasks.

Runs only in the bench's own Celery venv (`celery -A bench.celery_app worker`): Celery 5.5+ needs
redis-py >= 6 and arq 0.28 needs < 6, so this module imports none of the project's packages.
The job code is the synchronous equivalent of the project's: requests + selectolax, summary kept
in Redis (scrape); a MIME message over a reused smtplib connection, sent marker in Redis (email);
nothing (no-op). There is no result backend: every task writes `enqueued start finished` (unix
seconds) to a Redis hash, which is how the bench sees completions and latencies.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import smtplib
import threading
import time
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

import redis
import requests  # type: ignore[import-untyped,unused-ignore]
from celery import Celery  # type: ignore[import-not-found,unused-ignore]
from selectolax.lexbor import LexborHTMLParser

from bench.common import CELERY_DOC_PREFIX, CELERY_SENT_PREFIX, HTTP_JOBS_SECRET, MAIL_FROM

BROKER_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SMTP_HOST = os.environ.get("BENCH_SMTP_HOST", "127.0.0.1")
SMTP_PORT = int(os.environ.get("BENCH_SMTP_PORT", "25"))
HTML_TYPES = ("text/html", "application/xhtml+xml")

app: Any = Celery("bench", broker=BROKER_URL)
app.conf.update(
    task_ignore_result=True,  # no result backend: tasks write their own times
    broker_connection_retry_on_startup=True,
    worker_redirect_stdouts=False,
    # An idle worker's BRPOP returns every 0.1 s instead of 1 s, so that it stops quickly
    # between runs; a busy worker's BRPOP returns at once anyway, so throughput is unchanged.
    broker_transport_options={"polling_interval": 0.1},
)

# Clients are made lazily per process (prefork children must not share the parent's sockets) and
# per thread where the client is not thread-safe (requests.Session, smtplib.SMTP).
_local = threading.local()
_redis_by_pid: dict[int, Any] = {}


def _redis() -> Any:
    pid = os.getpid()
    if pid not in _redis_by_pid:
        _redis_by_pid[pid] = redis.Redis.from_url(BROKER_URL)
    return _redis_by_pid[pid]


def _http() -> Any:
    if getattr(_local, "pid", None) != os.getpid():
        _local.__dict__.clear()
        _local.pid = os.getpid()
    if not hasattr(_local, "http"):
        _local.http = requests.Session()
    return _local.http


def _smtp() -> smtplib.SMTP:
    if getattr(_local, "pid", None) != os.getpid():
        _local.__dict__.clear()
        _local.pid = os.getpid()
    if getattr(_local, "smtp", None) is None:
        _local.smtp = smtplib.SMTP(SMTP_HOST, SMTP_PORT, timeout=30)
    client: smtplib.SMTP = _local.smtp
    return client


def _timed(times_key: str, n: int, enqueued: float, work: Callable[[], None]) -> None:
    """Run `work`, then record `enqueued started finished ok` for the bench, success or not."""
    started, ok = time.time(), "0"
    try:
        work()
        ok = "1"
    finally:
        _redis().hset(times_key, str(n), f"{enqueued} {started} {time.time()} {ok}")


def summarize(html: str) -> dict[str, str]:
    """What the project's jobs.scrape.html.summarize_html keeps: title, description, links, text."""
    tree = LexborHTMLParser(html)
    title = tree.css_first("title")
    description = tree.css_first('meta[name="description" i]')
    links = [node.attributes.get("href") or "" for node in tree.css("a[href]")]
    tree.strip_tags(["script", "style", "noscript", "template"])
    root = tree.body or tree.root
    text = " ".join(root.text(separator=" ", strip=True).split()) if root else ""
    return {
        "title": title.text(strip=True) if title else "",
        "description": (description.attributes.get("content") or "") if description else "",
        "links_count": str(len(links)),
        "text": text,
    }


def fetch_and_save(url: str, n: int) -> None:
    response = _http().get(url, timeout=20)
    response.raise_for_status()
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
    if content_type not in HTML_TYPES:
        raise ValueError(f"not an HTML page: {content_type}")
    summary = summarize(response.text)
    _redis().hset(CELERY_DOC_PREFIX + str(n), mapping={"url": url, **summary})


def build_and_send(to: str, subject: str, text: str, html: str) -> None:
    message = EmailMessage()
    message["From"] = MAIL_FROM
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message_id = make_msgid(domain="localhost")
    message["Message-ID"] = message_id
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    try:
        _smtp().send_message(message)
    except smtplib.SMTPServerDisconnected:  # the server dropped an idle connection: once more
        _local.smtp = None
        _smtp().send_message(message)
    _redis().set(CELERY_SENT_PREFIX + message_id, "1", ex=7 * 24 * 3600)


def scrape(url: str, enqueued: float, times_key: str, n: int) -> None:
    _timed(times_key, n, enqueued, lambda: fetch_and_save(url, n))


def send_email(
    to: str, subject: str, text: str, html: str, enqueued: float, times_key: str, n: int
) -> None:
    _timed(times_key, n, enqueued, lambda: build_and_send(to, subject, text, html))


def noop(enqueued: float, times_key: str, n: int) -> None:
    _timed(times_key, n, enqueued, lambda: None)


def signed_post(url: str, n: int) -> None:
    """What the project's http job does: a JSON body signed with HMAC-SHA256 over timestamp and
    body, the job id and try as headers, a 2xx or an error, at most 64 KB of answer kept."""
    body = json.dumps({"n": n}, separators=(",", ":")).encode()
    timestamp = str(int(time.time()))
    digest = hmac.new(HTTP_JOBS_SECRET.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    headers = {
        "Content-Type": "application/json",
        "X-Asyncjobs-Timestamp": timestamp,
        "X-Asyncjobs-Signature": "sha256=" + digest.hexdigest(),
        "X-Asyncjobs-Job-Id": str(n),
        "X-Asyncjobs-Try": "1",
    }
    response = _http().post(url, data=body, headers=headers, timeout=30, allow_redirects=False)
    response.raise_for_status()
    _kept = response.content[: 64 * 1024]  # the body read, its start kept as a result is


def http(url: str, enqueued: float, times_key: str, n: int) -> None:
    _timed(times_key, n, enqueued, lambda: signed_post(url, n))


def user_get(url: str, enqueued: float, times_key: str, n: int) -> None:
    _timed(times_key, n, enqueued, lambda: _http().get(url, timeout=20).raise_for_status())


scrape_task = app.task(name="bench.scrape")(scrape)
user_get_task = app.task(name="bench.user_get")(user_get)
http_task = app.task(name="bench.http")(http)
email_task = app.task(name="bench.email")(send_email)
noop_task = app.task(name="bench.noop")(noop)
