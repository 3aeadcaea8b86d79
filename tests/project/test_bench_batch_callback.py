"""`python -m bench jobs` runs issue 31's batch-callback row (bench/batchcallback.py) for asyncjobs.

Never asserts a speed (this machine is shared; see docs/benchmarks.md): only that each batch's
callback ran once, after all 1,000 jobs had completed, and was handed the counts {complete: N}.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.batchcallback import BATCH_JOBS, ROUNDS

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(150)
@pytest.mark.slow
def test_each_batch_callback_runs_once_with_the_counts(tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    command = [sys.executable, "-m", "bench", "jobs", "--quick", "--engines", "asyncjobs",
               "--workloads", "noop", "--json", str(results)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "### Batch with a callback" in done.stdout, done.stdout

    data: dict[str, Any] = json.loads(results.read_text())
    [row] = data["batch_callback"]
    assert row["engine"] == "asyncjobs" and row["status"] == "ok", row
    with_callback = [r for r in row["rounds"] if r["callback"]]
    without = [r for r in row["rounds"] if not r["callback"]]
    assert len(with_callback) == len(without) == ROUNDS["quick"], row
    for batch in row["rounds"]:
        assert batch["completed"] == BATCH_JOBS and batch["failed"] == 0, batch
    for batch in with_callback:
        assert batch["callback_try"] == 1, batch  # ran once, not retried
        assert batch["counts"] == {"complete": BATCH_JOBS}, batch
