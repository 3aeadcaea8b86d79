"""Deadlines for the many short waits of a busy worker, without an event-loop timer each.

`asyncio.timeout()` arms a timer on the loop when a block starts and cancels it when the block
ends; under uvloop each is a libuv handle made, started, stopped and closed. A scrape job used
four (its job, its try, its request twice over) and they were about a tenth of its CPU. Here
the deadlines of one loop are kept in buckets of GRANULARITY_S, and a timer is armed for the
earliest bucket only (when an earlier one appears it gets a timer too, and the later timer
fires for nothing): entering a block is a set insertion, leaving it a removal.

The price is precision: a deadline fires up to GRANULARITY_S late (never early). That is
nothing next to what these limits are for (seconds for a request, minutes for a job).
Behaviour otherwise follows asyncio.timeout: when time is up the block's task is cancelled and
the block raises TimeoutError; a cancellation from outside stays a CancelledError.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import weakref
from types import TracebackType

GRANULARITY_S = 0.05


class _Sweeper:
    """One loop's deadlines: bucket number -> the blocks due then, and a timer for the earliest.

    It keeps no timer handle (a handle holds its loop, and the loop is the weak key this
    sweeper is found by): a timer made obsolete by an earlier one simply fires for nothing."""

    def __init__(self) -> None:
        self._buckets: dict[int, set[deadline]] = {}
        self._due: list[int] = []  # bucket numbers, a heap (an emptied bucket stays till due)
        self._armed: set[int] = set()  # buckets a timer is set for

    def add(self, block: deadline, when: float) -> int:
        bucket = math.ceil(when / GRANULARITY_S)
        members = self._buckets.get(bucket)
        if members is None:
            members = self._buckets[bucket] = set()
            heapq.heappush(self._due, bucket)
            if not self._armed or bucket < min(self._armed):
                self._arm(bucket)
        members.add(block)
        return bucket

    def remove(self, block: deadline, bucket: int) -> None:
        members = self._buckets.get(bucket)
        if members is not None:
            members.discard(block)

    def _arm(self, bucket: int) -> None:
        self._armed.add(bucket)
        asyncio.get_running_loop().call_at(bucket * GRANULARITY_S, self._fire, bucket)

    def _fire(self, bucket: int) -> None:
        self._armed.discard(bucket)
        now = asyncio.get_running_loop().time()
        while self._due and self._due[0] * GRANULARITY_S <= now:
            for block in self._buckets.pop(heapq.heappop(self._due), ()):
                block._expire()
        if self._due and (not self._armed or self._due[0] < min(self._armed)):
            self._arm(self._due[0])


_sweepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Sweeper] = (
    weakref.WeakKeyDictionary()
)


def _sweeper(loop: asyncio.AbstractEventLoop) -> _Sweeper:
    sweeper = _sweepers.get(loop)
    if sweeper is None:
        sweeper = _sweepers[loop] = _Sweeper()
    return sweeper


class deadline:  # lower case: it is used as asyncio.timeout is
    """`async with deadline(seconds):` the block gets `seconds` (None: no limit), then its task
    is cancelled and the block raises TimeoutError; at most GRANULARITY_S late."""

    __slots__ = ("_bucket", "_cancelling", "_expired", "_seconds", "_sweeper", "_task")

    def __init__(self, seconds: float | None) -> None:
        self._seconds = seconds
        self._task: asyncio.Task[object] | None = None
        self._sweeper: _Sweeper | None = None
        self._bucket: int | None = None
        self._cancelling = 0
        self._expired = False

    async def __aenter__(self) -> deadline:
        if self._seconds is None:
            return self
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("deadline() must be used inside a task")
        loop = asyncio.get_running_loop()
        self._task, self._cancelling = task, task.cancelling()
        self._sweeper = _sweeper(loop)
        self._bucket = self._sweeper.add(self, loop.time() + self._seconds)
        return self

    def _expire(self) -> None:
        if self._task is not None and not self._expired:
            self._expired = True
            self._task.cancel()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._sweeper is not None and self._bucket is not None:
            self._sweeper.remove(self, self._bucket)
        task, self._task = self._task, None
        # ours was the cancellation, and no one else asked for one: it is a timeout
        if (
            self._expired
            and task is not None
            and task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc
