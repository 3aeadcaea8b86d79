"""asyncjobs.deadlines.deadline behaves as asyncio.timeout does, one bucket late at most, and leaves
nothing behind: on the default loop and on uvloop, which the worker runs."""

from __future__ import annotations

import asyncio
import gc
import math
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from asyncjobs.deadlines import GRANULARITY_S, _sweeper, deadline

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run(loop_name: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    loop = LOOPS[loop_name]()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_block_past_its_deadline_raises_timeout_error_never_early(loop_name: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            async with deadline(0.2):
                await asyncio.sleep(30)
        waited = loop.time() - started
        assert waited >= 0.2 - 0.005  # the loop's clock, not a wall clock: never early
        assert waited < 10  # a generous bound: a busy machine is slow, not wrong

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_block_in_time_is_not_cancelled_later(loop_name: str) -> None:
    async def main() -> None:
        async with deadline(0.5):  # ample for one loop turn, even on a loaded machine
            await asyncio.sleep(0)
        # past the deadline and a few buckets: nothing cancels this task any more
        await asyncio.sleep(0.5 + GRANULARITY_S * 4)
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_cancellation_from_outside_stays_a_cancellation(loop_name: str) -> None:
    async def main() -> None:
        entered = asyncio.Event()

        async def inner() -> None:
            async with deadline(30):
                entered.set()
                await asyncio.sleep(30)

        task = asyncio.ensure_future(inner())
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_nested_deadlines_each_answer_for_their_own_block(loop_name: str) -> None:
    async def main() -> None:
        caught = False
        async with deadline(30):
            try:
                async with deadline(0.1):
                    await asyncio.sleep(30)
            except TimeoutError:
                caught = True
            await asyncio.sleep(GRANULARITY_S * 3)  # the outer block goes on, not cancelled
        assert caught
        with pytest.raises(TimeoutError):  # the outer one times out with an inner one open
            async with deadline(0.1), deadline(30):
                await asyncio.sleep(30)

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_thousands_of_blocks_leave_nothing_behind(loop_name: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        entered: list[float] = []

        async def one(i: int) -> None:
            # long deadlines: the blocks must not expire, however slow the machine
            async with deadline(30 + (i % 7) * GRANULARITY_S):
                entered.append(loop.time())
                await asyncio.sleep(0)

        await asyncio.gather(*(one(i) for i in range(5000)))
        sweeper = _sweeper(loop)
        assert sum(len(members) for members in sweeper._buckets.values()) == 0
        # buckets per distinct deadline and bucket the entries spanned, not one per block
        span = max(entered) - min(entered)
        assert len(sweeper._buckets) <= 7 * (math.ceil(span / GRANULARITY_S) + 2)
        assert len(sweeper._buckets) < 5000
        async with deadline(None):  # no limit: not even a bucket
            await asyncio.sleep(0)

    run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_a_finished_loop_is_not_kept_alive_by_its_deadlines(loop_name: str) -> None:
    async def main() -> None:
        async with deadline(30):
            await asyncio.sleep(0)

    loop = LOOPS[loop_name]()
    loop.run_until_complete(main())
    loop.close()
    gone = weakref.ref(loop)
    del loop
    gc.collect()
    assert gone() is None
