"""Work whose cost depends on untrusted input (a caller's CSS selectors, a newsletter's
templates) runs in a small pool of processes, each call under a deadline.

One worker process runs every job in one event loop: a selector that costs seconds of CPU on a
deeply nested page, or a template with nested loops, would hold every other job (and the lease
renewals) for as long as it runs, and a thread cannot be stopped. A pool process can: past the
deadline pebble kills it (and starts a fresh one), and the job fails for good with the reason.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import resource
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any, TypeVar

from pebble import CONSTS, ProcessPool

from asyncjobs.errors import PermanentJobError
from asyncjobs.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

# pebble stops a late call with SIGTERM, then SIGKILL 3 s later if the process still runs, and
# a process busy in C code (lexbor matching a selector) does not run its SIGTERM handler: it
# took limit + 3 s. The calls here are pure computation with nothing to clean up.
CONSTS.term_timeout = 0.2


class CpuLimitExceeded(PermanentJobError):
    """The input made the work run past its deadline: trying again would do the same."""


def limit_memory(megabytes: int) -> None:
    """In a pool process: past this address space, allocations fail with MemoryError."""
    if megabytes:
        size = megabytes * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size, size))


class CpuPool:
    """`workers` processes (spawned: the worker's loop, sockets and threads stay behind), each
    limited to `memory_mb` of address space (0: no limit)."""

    def __init__(self, workers: int, seconds: float, memory_mb: int = 0) -> None:
        self.seconds = seconds
        self.memory_mb = memory_mb
        self._pool = ProcessPool(
            max_workers=workers,
            context=multiprocessing.get_context("spawn"),
            initializer=limit_memory,
            initargs=(memory_mb,),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> CpuPool:
        return cls(settings.cpu_workers, settings.cpu_limit_seconds, settings.cpu_memory_limit_mb)

    async def run(self, what: str, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` in a pool process; CpuLimitExceeded past the deadline."""
        future = self._pool.schedule(function, args=args, timeout=self.seconds)
        try:
            return await asyncio.wrap_future(future)
        except FutureTimeoutError:
            log.warning("%s ran past its %g s limit and was stopped", what, self.seconds)
            raise CpuLimitExceeded(
                f"{what} took more than {self.seconds:g} s (CPU_LIMIT_SECONDS); stopped"
            ) from None
        except MemoryError:
            log.warning("%s needed more than its %d MiB", what, self.memory_mb)
            raise CpuLimitExceeded(
                f"{what} needed more than {self.memory_mb} MiB (CPU_MEMORY_LIMIT_MB); stopped"
            ) from None
        except asyncio.CancelledError:  # the job was aborted, or the worker stops: so does the work
            future.cancel()  # type: ignore[no-untyped-call]
            raise

    async def close(self) -> None:
        self._pool.stop()  # type: ignore[no-untyped-call]
        await asyncio.to_thread(self._pool.join, 5)
