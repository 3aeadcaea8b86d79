"""The Celery producer: runs in the Celery venv for the whole bench run, enqueueing on request.

One request per line on stdin, JSON `{"workload", "n", "site", "times_key", "interval"}`; one
answer per line on stdout, `{"sent", "seconds"}`. Kept running so that its start-up (importing
Celery) is paid once, not in every measured run. Each task carries its enqueue time (unix
seconds) as an argument, as an arq job carries it in its job record.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from bench.celery_app import app
from bench.common import EMAIL_HTML, EMAIL_SUBJECT, EMAIL_TEXT, page_url, recipient, task_url

TASKS = {
    "scrape": "bench.scrape",
    "email": "bench.email",
    "noop": "bench.noop",
    "user-noop": "bench.noop",  # the same body: Celery has no other kind of task
    "user-get": "bench.user_get",
    "http": "bench.http",
}


def task_args(workload: str, n: int, site: str, times_key: str, now: float) -> list[Any]:
    if workload in ("scrape", "user-get"):
        return [page_url(site, n), now, times_key, n]
    if workload == "http":
        return [task_url(site, n), now, times_key, n]
    if workload == "email":
        subject, text, html = (t.format(n=n) for t in (EMAIL_SUBJECT, EMAIL_TEXT, EMAIL_HTML))
        return [recipient(n), subject, text, html, now, times_key, n]
    return [now, times_key, n]


def send(producer: Any, request: dict[str, Any]) -> dict[str, Any]:
    workload, interval = request["workload"], float(request["interval"])
    started = time.time()
    for n in range(int(request["n"])):
        if interval and n:
            time.sleep(interval)
        args = task_args(workload, n, request["site"], request["times_key"], time.time())
        app.send_task(TASKS[workload], args=args, producer=producer)
    return {"sent": request["n"], "seconds": time.time() - started}


def main() -> None:
    with app.producer_or_acquire() as producer:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            print(json.dumps(send(producer, json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
