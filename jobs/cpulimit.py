"""Work whose cost depends on untrusted input (a caller's CSS selectors, a newsletter's
templates and addresses, an image) runs in a small pool of processes, each call under a
deadline and a memory limit, the pool shared fairly between the API keys that asked for it.

One worker process runs every job in one event loop: a selector that costs seconds of CPU on a
deeply nested page, or a template with nested loops, would hold every other job (and the lease
renewals) for as long as it runs, and a thread cannot be stopped. A pool process can: past the
deadline pebble kills it (and starts a fresh one), and the job fails for good with the reason.

Fair: each owner (the API key a job or request came from; "" for work nobody owns) waits in a
queue of its own, and free processes are handed to the owners in turn (round robin). One key
with 20 costly calls waiting does not make another's one call wait for them: at most for the
calls running, and one more of each owner ahead of it.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import resource
from collections import deque
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
        self._free = workers
        # owners with calls waiting, in turn order (a dict: insertion-ordered, O(1) removal)
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}
        self._pool = ProcessPool(
            max_workers=workers,
            context=multiprocessing.get_context("spawn"),
            initializer=limit_memory,
            initargs=(memory_mb,),
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> CpuPool:
        return cls(settings.cpu_workers, settings.cpu_limit_seconds, settings.cpu_memory_limit_mb)

    async def run(self, what: str, function: Callable[..., T], *args: Any, owner: str = "") -> T:
        """`function(*args)` in a pool process, when `owner`'s turn comes; CpuLimitExceeded
        past the deadline or the memory limit."""
        await self._turn(owner)
        try:
            return await self._run(what, function, args)
        finally:
            self._free += 1
            self._hand_out()

    async def _turn(self, owner: str) -> None:
        """Take a free process, now if one is free and nobody waits, else in `owner`'s turn."""
        if self._free and not self._waiting:
            self._free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(owner, deque()).append(turn)
        self._hand_out()
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():  # handed a process just as it was cancelled
                self._free += 1
                self._hand_out()
            raise

    def _hand_out(self) -> None:
        """Free processes to the owners in turn: the first owner's first call, that owner to
        the back of the line if it has more."""
        while self._free and self._waiting:
            owner, calls = next(iter(self._waiting.items()))
            del self._waiting[owner]
            turn = calls.popleft()
            if calls:
                self._waiting[owner] = calls
            if turn.cancelled():
                continue
            self._free -= 1
            turn.set_result(None)

    async def _run(self, what: str, function: Callable[..., T], args: tuple[Any, ...]) -> T:
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
