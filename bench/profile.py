"""Where a worker's CPU goes during a bench run: py-spy samples, summed per function and library.

`python -m bench jobs --engines asyncjobs --workloads email --profile` attaches py-spy to each
worker for the measured part of the run only (enqueue to last completion) and prints, per run,
the share of busy samples spent in (below) each of the project's functions and each library.
`python -m bench.profile FILE...` prints the same for raw py-spy files recorded before.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import signal
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench.services import REPO, BenchError

SAMPLES_PER_S = 250
PROJECT_PACKAGES = ("app", "asyncjobs", "jobs")
# the worker's entry point, under every sample: arq's CLI and run loop (its job handling is ours)
ENTRY = {"<frozen runpy>", "click", "arq"}
# `function (path:line)`, as py-spy's raw format writes a frame
FRAME = re.compile(r"^(?P<function>.*) \((?P<path>.*?)(?::\d+)?\)$")
LIBRARY = re.compile(r"(?:site-packages/|python3\.\d+/(?!site-packages))(?P<name>[^/]+)")


class Profiler:
    """py-spy attached to one process (and its children) until stopped with SIGINT."""

    def __init__(self, pid: int, output: Path) -> None:
        self.pid, self.output = pid, output
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        # the venv's bin may not be on PATH when the bench runs as .venv/bin/python
        py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=Path(sys.executable).parent)
        if py_spy is None:
            raise BenchError("--profile needs py-spy: pip install py-spy")
        self._process = await asyncio.create_subprocess_exec(
            py_spy, "record", "--pid", str(self.pid), "--subprocesses", "--nonblocking",
            "--rate", str(SAMPLES_PER_S), "--format", "raw", "--output", str(self.output),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        await asyncio.sleep(0.5)  # attaching takes a moment; the run has not started yet

    async def stop(self) -> str:
        """Stop sampling and return the summary (py-spy writes its file on SIGINT)."""
        if self._process is None:
            return ""
        if self._process.returncode is None:
            self._process.send_signal(signal.SIGINT)
            await asyncio.wait_for(self._process.wait(), 30)
        return summarize(self.output) if self.output.exists() else "(py-spy wrote nothing)"


@dataclass(frozen=True)
class Frame:
    function: str
    where: str  # a project module (jobs/mail/smtp.py) or a library name (aiosmtplib)
    project: bool


def parse_frame(text: str) -> Frame:
    match = FRAME.match(text)
    function, path = (match["function"], match["path"]) if match else (text, "")
    try:
        relative = Path(path).resolve().relative_to(REPO)
    except ValueError:
        relative = None
    if relative is not None and relative.parts[:1] and relative.parts[0] in PROJECT_PACKAGES:
        return Frame(function, str(relative), True)
    library = LIBRARY.search(path)
    name = library["name"].removesuffix(".py") if library else (path or "?")
    return Frame(function, name, False)


def library_of(frame: Frame) -> str:
    """aiohttp for aiohttp/client.py, logging for logging/__init__.py."""
    return frame.where.split("/", 1)[0].removesuffix(".py")


def summarize(path: Path, top: int = 25) -> str:
    """Inclusive shares: a function's share is the samples with it anywhere on the stack."""
    functions: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    below: Counter[str] = Counter()  # samples with a library anywhere on the stack
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [parse_frame(f) for f in stack.split(";") if not f.startswith("process ")]
        functions.update({f"{f.where}:{f.function}": n for f in set(frames) if f.project})
        below.update(dict.fromkeys({library_of(f) for f in frames if not f.project} - ENTRY, n))
        if frames:  # self time: where the innermost frame is
            libraries[frames[-1].where] += n
    if not total:
        return "(no samples)"
    lines = [f"{total:,} busy samples", "", "| project function (inclusive) | share |"]
    lines += ["|---|---:|"]
    lines += [f"| {name} | {n / total:.0%} |" for name, n in functions.most_common(top)]
    lines += ["", "| library (inclusive: on the stack) | share |", "|---|---:|"]
    lines += [f"| {name} | {n / total:.0%} |" for name, n in below.most_common(top // 2)]
    lines += ["", "| self time in (module or library) | share |", "|---|---:|"]
    lines += [f"| {name} | {n / total:.0%} |" for name, n in libraries.most_common(top // 2)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("files", nargs="+", type=Path, help="py-spy --format raw output")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    for file in args.files:
        print(f"## {file}\n\n{summarize(file, args.top)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
