"""`python -m app worker --processes N`: N worker processes from one command, all cores in use.

Each child is the ordinary single-process entry point, `arq worker_settings.WorkerSettings`, so
a child behaves exactly like a worker started by hand. The supervisor restarts a child that
exits (a crash, a SIGKILL, the OOM killer; backing off when one keeps dying at once), and on
SIGTERM or SIGINT passes SIGTERM to every child (on Linux the kernel does it too when the
supervisor itself is killed: see `die_with_parent`), which finishes its running jobs within
SHUTDOWN_GRACE and leaves the rest to be re-run; a child still there after the grace and a
margin is killed. A killed child's jobs run again when their leases end (JOB_LEASE_SECONDS).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from dataclasses import dataclass, field

from asyncjobs.settings import Settings

log = logging.getLogger("app.supervisor")

WORKER_COMMAND = (sys.executable, "-m", "arq", "worker_settings.WorkerSettings")
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """In the child, before it runs the worker: on Linux, ask the kernel to send it SIGTERM
    when the supervisor dies, however it dies (a SIGKILL gives the supervisor no chance to
    pass anything on). Without it, a killed supervisor left its workers running and taking
    jobs, and its restart made twice as many. SIGTERM, so a child still finishes its jobs
    within SHUTDOWN_GRACE. Elsewhere there is no such call: nothing is done."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the supervisor died before the call: nobody will signal
        os.kill(os.getpid(), signal.SIGTERM)


STOP_MARGIN_S = 5.0  # beyond SHUTDOWN_GRACE, for a child to close its connections
QUICK_EXIT_S = 5.0  # a child that dies sooner than this after starting is restarted later
MAX_BACKOFF_S = 30.0


def process_count(settings: Settings) -> int:
    """WORKER_PROCESSES, or one per CPU when it is 0 (the default)."""
    return settings.worker_processes or os.cpu_count() or 1


@dataclass
class Child:
    slot: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    backoff: float = 0.0
    restarts: int = 0


@dataclass
class Supervisor:
    settings: Settings
    processes: int
    command: tuple[str, ...] = WORKER_COMMAND
    children: list[Child] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop, sig)
        self.children = [Child(slot) for slot in range(1, self.processes + 1)]
        log.info("supervisor %d: starting %d worker processes", os.getpid(), self.processes)
        try:
            await asyncio.gather(*(self._keep_running(child) for child in self.children))
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        log.info("supervisor: all workers stopped")
        return 0

    def _stop(self, sig: signal.Signals) -> None:
        if self.stopping.is_set():
            return
        log.info("supervisor: %s, stopping %d workers (grace %g s)", sig.name,
                 len(self.children), self.settings.shutdown_grace)  # fmt: skip
        self.stopping.set()
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                child.process.send_signal(signal.SIGTERM)

    async def _keep_running(self, child: Child) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            child.process = await asyncio.create_subprocess_exec(
                *self.command, preexec_fn=die_with_parent
            )
            child.started_at = loop.time()
            log.info("supervisor: worker %d started (pid %d)", child.slot, child.process.pid)
            code = await self._wait(child.process)
            if self.stopping.is_set():
                log.info("supervisor: worker %d (pid %d) stopped, exit %s",
                         child.slot, child.process.pid, code)  # fmt: skip
                return
            child.restarts += 1
            quick = loop.time() - child.started_at < QUICK_EXIT_S
            child.backoff = min(MAX_BACKOFF_S, max(1.0, child.backoff * 2)) if quick else 0.0
            log.warning("supervisor: worker %d (pid %d) exited with %s; restarting in %g s",
                        child.slot, child.process.pid, code, child.backoff)  # fmt: skip
            if child.backoff:
                with contextlib.suppress(TimeoutError):  # a stop request ends the wait
                    await asyncio.wait_for(self.stopping.wait(), child.backoff)

    async def _wait(self, process: asyncio.subprocess.Process) -> int:
        """The child's exit code; once stopping, at most the grace and a margin, then SIGKILL."""
        waiting = asyncio.ensure_future(process.wait())
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({waiting, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not waiting.done():
            if process.returncode is None:  # started as the stop came: it may have missed it
                process.send_signal(signal.SIGTERM)
            try:
                return await asyncio.wait_for(waiting, self.settings.shutdown_grace + STOP_MARGIN_S)
            except TimeoutError:
                log.warning("supervisor: worker pid %d outlived its grace; killing it", process.pid)
                process.kill()
                return await process.wait()
        return waiting.result()


async def supervise(settings: Settings, processes: int) -> int:
    return await Supervisor(settings, processes).run()
