"""Command line: `asyncjobs dev` (whole local stack), `asyncjobs web` (API only) or
`asyncjobs worker --processes N` (N worker processes, restarted when one dies). `python -m app`
is the same; the `asyncjobs` command also runs from a project that has its own `app/`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from app.devstack import DevStackError, run_dev
from app.supervisor import process_count, supervise
from app.web import run_web
from asyncjobs.logs import configure_logging
from asyncjobs.registry import JobRegistrationError
from asyncjobs.settings import get_settings
from asyncjobs.speedups import install_event_loop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asyncjobs", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("dev", help="web + worker + local Redis and mail sink when needed")
    commands.add_parser("web", help="the HTTP API only (run the worker with `arq`)")
    worker = commands.add_parser("worker", help="N worker processes, supervised")
    worker.add_argument(
        "--processes", type=int, default=None,
        help="how many (default WORKER_PROCESSES, 0 or unset: one per CPU)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.command == "dev":  # the worker child inherits these
        os.environ.setdefault("LOG_FORMAT", "text")  # people read the dev console
        os.environ.setdefault("MAIL_ALLOW_LOCAL_DOMAINS", "true")  # you@localhost, on a laptop
    configure_logging()
    install_event_loop()  # uvloop for the API and the dev launcher (see asyncjobs/speedups.py)
    settings = get_settings()
    if args.command == "web":
        try:
            run_web(settings)
        except JobRegistrationError as exc:  # JOB_MODULES: one line, not a traceback
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "worker":
        processes = args.processes if args.processes is not None else process_count(settings)
        if processes < 1:
            parser.error("--processes must be at least 1")
        return asyncio.run(supervise(settings, processes))
    try:
        return asyncio.run(run_dev(settings))
    except DevStackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
