"""Peak RSS and CPU time of a process tree (a worker and, for Celery prefork, its children).

Read from /proc, which is what psutil reads on Linux: CI installs only the project's `dev`
extras, and the bench must run there too (tests/project/test_bench_quick.py), so it needs no psutil.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
SAMPLE_EVERY_S = 0.05


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants alive now."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                with contextlib.suppress(OSError):
                    todo.extend(int(c) for c in (task / "children").read_text().split())
    return found


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process (None once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


@dataclass
class TreeSampler:
    """Samples a process tree in the background: the peak of its summed RSS, and its CPU time
    from `start()` on (a process that appears later counts from zero)."""

    pid: int
    peak_rss: int = 0
    _base_cpu: dict[int, float] = field(default_factory=dict)
    _last_cpu: dict[int, float] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._base_cpu = {p: c for p in process_tree(self.pid) if (c := cpu_seconds(p)) is not None}
        self._last_cpu = dict(self._base_cpu)
        self.peak_rss = 0
        self._sample()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> tuple[float, float]:
        """(peak RSS in MB, CPU seconds since start)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._sample()
        cpu = sum(last - self._base_cpu.get(pid, 0.0) for pid, last in self._last_cpu.items())
        return self.peak_rss / 1e6, cpu

    def _sample(self) -> None:
        pids = process_tree(self.pid)
        self.peak_rss = max(self.peak_rss, sum(rss_bytes(p) for p in pids))
        for pid in pids:
            if (cpu := cpu_seconds(pid)) is not None:
                self._last_cpu[pid] = cpu

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_EVERY_S)
            self._sample()
