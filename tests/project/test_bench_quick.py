"""`python -m bench --quick` runs end to end and every engine completes every job.

Never asserts a speed (this machine is shared; see docs/benchmarks.md): only that the tables are
printed, that each engine finished all N jobs of each workload without a failure, that the site
and the sink saw the work, and that the API answered every request with 202. The first run
creates the bench's Celery venv from PyPI; when that cannot be done the test fails and says why.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.engines import ENGINES
from bench.runner import PICKUP_JOBS
from bench.workloads import WORKLOADS

REPO = Path(__file__).resolve().parents[2]
BENCH_TIMEOUT_S = 240


@pytest.mark.timeout(BENCH_TIMEOUT_S + 60)
@pytest.mark.slow
def test_quick_bench_completes_every_job_of_every_engine(tmp_path: Path) -> None:
    results = tmp_path / "bench.json"
    command = [sys.executable, "-m", "bench", "--quick", "--json", str(results)]
    try:
        done = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        pytest.fail(f"`python -m bench --quick` ran over {BENCH_TIMEOUT_S} s:\n{stderr[-3000:]}")
    assert done.returncode == 0, (
        f"`python -m bench --quick` exited {done.returncode}:\n{done.stderr[-4000:]}"
    )

    for heading in ("## Benchmark results", "### (a) scrape", "### (b) email", "### (c) no-op",
                    "### Pickup latency", "### API: `POST /jobs/email`"):  # fmt: skip
        assert heading in done.stdout, f"no {heading!r} in the output:\n{done.stdout}"
    assert "| engine | done | jobs/s |" in done.stdout

    data: dict[str, Any] = json.loads(results.read_text())
    assert data["mode"] == "quick"
    runs = {(r["engine"], r["workload"]): r for r in data["runs"]}
    assert set(runs) == {(e, w) for e in ENGINES for w in WORKLOADS}
    for (engine, workload), run in runs.items():
        n = WORKLOADS[workload].quick
        what = f"{engine} x {workload}: {run['status']}, {run['completed']}/{n} done, " + (
            f"{run['failed']} failed, error: {run['error']}"
        )
        assert run["n"] == n, what
        assert run["status"] == "ok" and run["completed"] == n and run["failed"] == 0, what
        if workload in ("scrape", "email"):  # the site served each page, the sink got each mail
            assert run["delivered"] is not None and run["delivered"] >= n, what

    pickups = {p["engine"]: p for p in data["pickup"]}
    assert set(pickups) == set(ENGINES)
    for engine, pickup in pickups.items():
        assert pickup["completed"] == PICKUP_JOBS, f"{engine} pickup: {pickup}"

    http = data["http"]
    assert http is not None and http["statuses"] == {"202": http["requests"]}, http


@pytest.mark.timeout(180)
@pytest.mark.slow
def test_the_worker_of_a_git_commit_runs_beside_todays(tmp_path: Path) -> None:
    """`asyncjobs@<commit>` exports that commit's tree and runs its worker (here HEAD's)."""
    results = tmp_path / "bench.json"
    command = [sys.executable, "-m", "bench", "jobs", "--quick", "--engines", "asyncjobs@HEAD",
               "--workloads", "noop", "--json", str(results)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    data: dict[str, Any] = json.loads(results.read_text())
    [run] = [r for r in data["runs"] if r["workload"] == "noop"]
    n = WORKLOADS["noop"].quick
    assert run["engine"] == "asyncjobs@HEAD" and run["completed"] == n and run["failed"] == 0, run
    assert "as of commit HEAD" in data["engines"]["asyncjobs@HEAD"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    assert (REPO / "bench" / ".cache" / "revisions" / head / "worker_settings.py").is_file()
