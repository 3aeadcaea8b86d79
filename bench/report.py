"""The bench's output: a markdown table per workload (plus pickup, API, and the issue's targets)
and the same figures as JSON. Ratios matter more than absolute numbers on a shared machine."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.batchcallback import CALLBACK_ARGUMENT, BatchCallbackResult, summary
from bench.common import PAGE_DELAY_S
from bench.engines import BEFORE_ISSUE_17, ENGINES, STACK_ENGINES, WIDE, Engine, engine_named
from bench.httpbench import PATH, HttpResult
from bench.runner import PickupResult, RunResult
from bench.workloads import SITE_WORKLOADS, WORKLOADS

BASELINE = "celery-prefork"
KNOWN_ENGINES = ENGINES | STACK_ENGINES


def compared(name: str) -> Engine | None:
    """The engine of a table row: known, or the worker at a git revision; None for the probe."""
    try:
        return engine_named(name)
    except KeyError:
        return None


def machine() -> dict[str, Any]:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(info: dict[str, Any], mode: str) -> str:
    return (
        f"Machine: {info['cores']} cores, {info['cpu']}, Python {info['python']}, "
        f"{info['system']}, {info['date']}. Mode: {mode}."
    )


def engines_legend(names: list[str]) -> list[str]:
    lines = ["Engines (each worker a subprocess; RSS and CPU summed over its process tree):", ""]
    for name in names:
        engine = engine_named(name)
        producer = engine.producer()[0] if engine.kind == "arq" else "Celery send_task"
        lines.append(f"- **{name}**: {engine.description}; enqueued with {producer}")
    return lines


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _pair(a: float | None, b: float | None) -> str:
    return "-" if a is None else f"{_num(a)} / {_num(b)}"


def _done(r: RunResult) -> str:
    text = f"{r.completed:,}/{r.n:,}"
    if r.failed:
        text += f" ({r.failed:,} failed)"
    if r.status != "ok":
        text += f" **{r.status}**"
    return text


def baseline_of(results: list[RunResult]) -> RunResult | None:
    """celery-prefork when it ran; else the first engine (the ablation's "none")."""
    baseline = next((r for r in results if r.engine == BASELINE and r.jobs_per_s), None)
    return baseline or next((r for r in results if r.jobs_per_s), None)


def ratio_to(r: RunResult, baseline: RunResult | None) -> str:
    if baseline and baseline.jobs_per_s and r.jobs_per_s:
        return f"{r.jobs_per_s / baseline.jobs_per_s:,.1f}x"
    return "-"


def workload_table(name: str, results: list[RunResult]) -> list[str]:
    baseline = baseline_of(results)
    n = results[0].n
    lines = [
        f"### {WORKLOADS[name].title} (N = {n:,})",  # type: ignore[index]
        "",
        f"| engine | done | jobs/s | x {baseline.engine if baseline else BASELINE} "
        "| enq→start p50 / p99 ms "
        "| enq→finish p50 / p99 ms | peak RSS MB | CPU s / 1k jobs | Redis cmds / job "
        "| enqueue s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.engine} | {_done(r)} | {_num(r.jobs_per_s)} | {ratio_to(r, baseline)} "
            f"| {_pair(r.start_p50_ms, r.start_p99_ms)} "
            f"| {_pair(r.finish_p50_ms, r.finish_p99_ms)} "
            f"| {_num(r.peak_rss_mb)} | {_num(r.cpu_s_per_1k, 2)} "
            f"| {_num(r.redis_cmds_per_job, 1)} | {_num(r.enqueue_s, 2)} |"
        )
    if name in SITE_WORKLOADS:
        lines += [
            "",
            f"Latency-bound limit, N x {PAGE_DELAY_S * 1000:.0f} ms / concurrency "
            "(and the most requests the site saw in flight at once):",
        ]
        for r in results:
            engine = engine_named(r.engine)
            limit = n * PAGE_DELAY_S / r.concurrency
            per = f"{engine.processes} processes, each " if engine.processes > 1 else ""
            why = (
                f" ({per}max_jobs {engine.max_jobs}, HTTP pool {engine.http_pool})"
                if engine.kind == "arq"
                else ""
            )
            lines.append(
                f"- {r.engine}: concurrency {r.concurrency}{why} → {limit:,.2f} s, "
                f"{n / limit:,.0f} jobs/s; seen in flight: {_num(r.peak_in_flight)}"
            )
    errors = [r for r in results if r.error]
    lines += [""] + [f"- {r.engine} error: {r.error}" for r in errors] if errors else []
    return lines


def drain_table(results: list[RunResult]) -> list[str]:
    baseline = baseline_of(results)
    lines = [
        f"### (d) no-op drain: {results[0].n:,} jobs queued before the worker starts "
        "(jobs/s from its first start to its last finish: the worker alone, not the producer)",
        "",
        f"| engine | done | jobs/s | x {baseline.engine if baseline else BASELINE} |",
        "| --- | --- | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.engine} | {_done(r)} | {_num(r.jobs_per_s)} | {ratio_to(r, baseline)} |"
        )
    errors = [r for r in results if r.error]
    return lines + ([""] + [f"- {r.engine} error: {r.error}" for r in errors] if errors else [])


def memory_table(r: RunResult) -> list[str]:
    return [
        f"### Memory with 1,000 scrape jobs in flight ({WIDE.description}; "
        f"pages that answer after 5 s; N = {r.n:,})",
        "",
        "| engine | done | peak in flight at the site | peak RSS MB | jobs/s | CPU s / 1k jobs |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        f"| {r.engine} | {_done(r)} | {_num(r.peak_in_flight)} | {_num(r.peak_rss_mb)} "
        f"| {_num(r.jobs_per_s)} | {_num(r.cpu_s_per_1k, 2)} |",
    ]


def pickup_table(results: list[PickupResult]) -> list[str]:
    lines = [
        "### Pickup latency on an idle worker (50 no-op jobs, one every 20 ms; enqueue → start)",
        "",
        "| engine | done | p50 ms | p99 ms | max ms |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for p in results:
        done = f"{p.completed}/{p.n}" + (" **error**" if p.error else "")
        lines.append(
            f"| {p.engine} | {done} | {_num(p.p50_ms, 1)} | {_num(p.p99_ms, 1)} "
            f"| {_num(p.max_ms, 1)} |"
        )
    return lines


def _with(a: float | None, b: float | None, digits: int) -> str:
    """`with / without (ratio)`."""
    if a is None or b is None:
        return "-"
    ratio = f" ({a / b:,.2f}x)" if b else ""
    return f"{a:,.{digits}f} / {b:,.{digits}f}{ratio}"


def batch_callback_table(results: list[BatchCallbackResult]) -> list[str]:
    n = results[0].n
    lines = [
        f"### Batch with a callback: {n:,} no-op jobs enqueued as `POST /batches` does, and "
        "one callback job run when all have ended (each batch also run without a callback; "
        "drain p50 over the batches, CPU and commands per job over all of them; "
        "with / without (ratio))",
        "",
        "| engine | batches | drain s | callback latency p50 / max ms "
        "| worker CPU ms / job | Redis CPU ms / job | Redis cmds / job |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    notes: list[str] = []
    for r in results:
        if r.status == "skipped":
            lines.append(f"| {r.engine} | skipped | - | - | - | - | - |")
            continue
        f = summary(r)
        with_cb = [b for b in r.rounds if b.callback]
        good = [
            b
            for b in with_cb
            if b.completed == r.n and not b.failed and b.callback_try == 1
            and b.counts == {"complete": r.n}
        ]  # fmt: skip
        batches = f"{len(good)}/{len(with_cb)} ok" + (
            f" **{r.status}**" if r.status != "ok" else ""
        )
        latency = _pair(f["latency_p50_ms"], f["latency_max_ms"])
        lines.append(
            f"| {r.engine} | {batches} | {_with(f['drain_s_with'], f['drain_s_without'], 2)} "
            f"| {latency} "
            f"| {_with(f['worker_cpu_ms_per_job_with'], f['worker_cpu_ms_per_job_without'], 3)} "
            f"| {_with(f['redis_cpu_ms_per_job_with'], f['redis_cpu_ms_per_job_without'], 3)} "
            f"| {_with(f['redis_cmds_per_job_with'], f['redis_cmds_per_job_without'], 1)} |"
        )
        for b in with_cb:
            if b not in good:
                notes.append(
                    f"- {r.engine}: a batch with {b.completed:,}/{b.n:,} jobs done "
                    f"({b.failed} failed), callback try {b.callback_try}, "
                    f"`{CALLBACK_ARGUMENT}` counts {b.counts}"
                )
        if r.error:
            notes.append(f"- {r.engine} error: {r.error}")
    latencies = [
        f"- {r.engine}: " + ", ".join(_num(b.latency_ms) for b in r.rounds if b.callback) + " ms"
        for r in results
        if r.rounds
    ]
    if latencies:
        lines += ["", "Callback latency of each batch (its start - the batch's last finish):"]
        lines += latencies
    return lines + (["", *notes] if notes else [])


def http_table(h: HttpResult) -> list[str]:
    statuses = ", ".join(f"{code}: {count:,}" for code, count in sorted(h.statuses.items()))
    lines = [
        f"### API: `POST {PATH}` against `python -m app web` "
        f"({h.requests:,} requests, {h.concurrency} concurrent)",
        "",
        "| requests/s | p50 ms | p99 ms | statuses | API peak RSS MB | API CPU s / 1k req "
        "| Redis cmds / req |",
        "| ---: | ---: | ---: | --- | ---: | ---: | ---: |",
        f"| {_num(h.requests_per_s)} | {_num(h.p50_ms, 1)} | {_num(h.p99_ms, 1)} "
        f"| {statuses or '-'} | {_num(h.peak_rss_mb)} | {_num(h.cpu_s_per_1k, 2)} "
        f"| {_num(h.redis_cmds_per_request, 1)} |",
    ]
    if h.error:
        lines += ["", f"- error: {h.error}"]
    return lines


def _rate(results: list[RunResult], workload: str, engine: str) -> float | None:
    return next(
        (r.jobs_per_s for r in results if r.workload == workload and r.engine == engine), None
    )


def _cmds(results: list[RunResult], workload: str, engine: str) -> float | None:
    return next(
        (r.redis_cmds_per_job for r in results if r.workload == workload and r.engine == engine),
        None,
    )


def _cpu(results: list[RunResult], workload: str, engine: str) -> float | None:
    return next(
        (r.cpu_s_per_1k for r in results if r.workload == workload and r.engine == engine), None
    )


def targets(runs: list[RunResult], pickups: list[PickupResult]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for the issue's targets, from what this run measured."""
    rows: list[tuple[str, str, str]] = []

    def ratio(target: str, workload: str, other: str, want: float) -> None:
        ours, theirs = _rate(runs, workload, "asyncjobs"), _rate(runs, workload, other)
        if ours is None or theirs is None:
            rows.append((target, "not measured", "-"))
            return
        rows.append(
            (target, f"{ours / theirs:,.2f}x", "met" if ours / theirs >= want else "missed")
        )

    # the targets of issue 17 (one process; arq-tuned runs on the same uvloop + hiredis stack)
    ratio("scrape ≥ 20x celery-prefork", "scrape", "celery-prefork", 20)
    ratio("scrape ≥ 3x arq-tuned", "scrape", "arq-tuned", 3)
    ratio("no-op ≥ 8x arq-tuned", "noop", "arq-tuned", 8)
    ratio("no-op drain ≥ 8x arq-tuned (the worker alone)", "noop-drain", "arq-tuned", 8)
    ours = _cmds(runs, "noop", "asyncjobs")
    plain = [c for e in ("arq-default", "arq-tuned") if (c := _cmds(runs, "noop", e)) is not None]
    if ours is not None and plain:
        rows.append((
            "no-op: fewer Redis cmds/job than plain arq",
            f"{ours:.1f} vs {min(plain):.1f}",
            "met" if ours < min(plain) else "missed",
        ))  # fmt: skip
    pickup = next((p for p in pickups if p.engine == "asyncjobs" and p.p50_ms is not None), None)
    if pickup is not None:
        assert pickup.p99_ms is not None
        p50, p99 = pickup.p50_ms or 0.0, pickup.p99_ms
        rows.append((
            "pickup p50 ≤ 2 ms",
            f"{p50:.1f} ms (p99 {p99:.1f})",
            "met" if p50 <= 2 else "missed",
        ))  # fmt: skip
    before = f"asyncjobs@{BEFORE_ISSUE_17}"
    for workload in ("scrape", "email"):
        now, then = _cpu(runs, workload, "asyncjobs"), _cpu(runs, workload, before)
        target = f"{workload}: CPU per job ≤ 0.5x {before}"
        if now is None or then is None:
            rows.append((target, "not measured", "-"))
            continue
        measured = f"{now:.2f} vs {then:.2f} ms ({now / then:.2f}x)"
        rows.append((target, measured, "met" if now <= then / 2 else "missed"))
    email = _rate(runs, "email", "asyncjobs")
    if email is not None:
        verdict = "met" if email >= 800 else "missed"
        rows.append(("email ≥ 800/s with one process", f"{email:,.0f}/s", verdict))
    wide = next((r for r in runs if r.engine == WIDE.name and r.peak_rss_mb is not None), None)
    if wide is not None:
        assert wide.peak_rss_mb is not None
        rows.append((
            "peak RSS ≤ 200 MB with 1,000 scrape jobs in flight",
            f"{wide.peak_rss_mb:.0f} MB, {_num(wide.peak_in_flight)} requests in flight at most",
            (
                "not reached: fewer in flight"
                if (wide.peak_in_flight or 0) < 1000
                else ("met" if wide.peak_rss_mb <= 200 else "missed")
            ),
        ))  # fmt: skip
    else:
        rows.append((
            "peak RSS ≤ 200 MB with 1,000 scrape jobs in flight",
            "measured in full mode only",
            "-",
        ))  # fmt: skip
    return rows


def render(
    info: dict[str, Any],
    mode: str,
    runs: list[RunResult],
    pickups: list[PickupResult],
    http: HttpResult | None,
    batches: list[BatchCallbackResult] | None = None,
) -> str:
    lines = ["## Benchmark results", "", machine_line(info, mode), ""]
    # in the order they ran (the command line's)
    ran = [r.engine for r in runs] + [p.engine for p in pickups]
    engines = list(dict.fromkeys(name for name in ran if compared(name)))
    if engines:
        lines += [*engines_legend(engines), ""]
    table_runs = [r for r in runs if compared(r.engine)]
    for name in WORKLOADS:
        results = [r for r in table_runs if r.workload == name]
        if results:
            lines += [*workload_table(name, results), ""]
    drained = [r for r in runs if r.workload == "noop-drain"]
    if drained:
        lines += [*drain_table(drained), ""]
    wide = next((r for r in runs if r.engine == WIDE.name), None)
    if wide is not None:
        lines += [*memory_table(wide), ""]
    if pickups:
        lines += [*pickup_table(pickups), ""]
    if batches:
        lines += [*batch_callback_table(batches), ""]
    if http is not None:
        lines += [*http_table(http), ""]
    rows = targets(runs, pickups)
    if rows:
        lines += [
            "### Targets (asyncjobs)",
            "",
            "| target | measured | verdict |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {t} | {m} | {v} |" for t, m, v in rows] + [""]
    return "\n".join(lines)


def write_json(
    path: Path,
    info: dict[str, Any],
    mode: str,
    runs: list[RunResult],
    pickups: list[PickupResult],
    http: HttpResult | None,
    batches: list[BatchCallbackResult] | None = None,
) -> None:
    data = {
        "machine": info,
        "mode": mode,
        "engines": {
            name: engine.description
            for name in [*KNOWN_ENGINES, *(r.engine for r in runs)]
            if (engine := compared(name)) is not None
        },
        "runs": [asdict(r) for r in runs],
        "pickup": [asdict(p) for p in pickups],
        "http": asdict(http) if http is not None else None,
        "batch_callback": [asdict(b) | {"summary": summary(b)} for b in batches or []],
        "targets": [
            {"target": t, "measured": m, "verdict": v} for t, m, v in targets(runs, pickups)
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
