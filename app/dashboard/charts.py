"""Charts as plain server-rendered SVG: the geometry of bars, lines, axes and ticks, computed
here and drawn by templates/_chart.html. No script, no inline style (the dashboard's CSP allows
neither): classes pick the colours in style.css.

A chart's x axis is time, one slot per bucket (a minute or an hour), the current one on the
right; its y axis starts at 0 and ends at a round value above the largest one shown.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 58, 12, 12, 42  # margins around the plot: tick labels, axis titles
Y_STEPS = 4  # about this many steps between 0 and the top of the y axis


@dataclass(frozen=True)
class Tick:
    at: float  # x or y in the SVG
    label: str


@dataclass(frozen=True)
class Bar:
    series: str  # a CSS class, and data-series for tests
    x: float
    y: float
    width: float
    height: float
    value: float
    title: str  # shown on hover


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    value: float
    title: str


@dataclass(frozen=True)
class Line:
    series: str
    paths: list[str]  # polyline point lists, split where a bucket has no value
    points: list[Point]


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    y_label: str
    x_label: str
    x_ticks: list[Tick]
    y_ticks: list[Tick]
    bars: list[Bar]
    lines: list[Line]
    legend: list[tuple[str, str]]  # (series, label)
    has_data: bool
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    right: int = WIDTH - RIGHT
    bottom: int = HEIGHT - BOTTOM


def nice_step(raw: float, *, whole: bool) -> float:
    """The smallest 1, 2 or 5 x 10^k at or above `raw` (at least 1 for whole numbers)."""
    if raw <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        step = factor * power
        if step >= raw * (1 - 1e-9):
            return max(step, 1.0) if whole else step
    return 10 * power  # not reached


def y_axis(peak: float, *, whole: bool) -> tuple[float, list[float]]:
    """(the axis's top, its tick values from 0): 2 to Y_STEPS + 1 ticks, round values."""
    step = nice_step(peak / Y_STEPS, whole=whole)
    steps = max(1, math.ceil(peak / step - 1e-9))
    return step * steps, [step * i for i in range(steps + 1)]


def count_label(value: float) -> str:
    return f"{value:,.0f}"


def seconds_label(value: float) -> str:
    """A duration for an axis or a tooltip: 0, 250 ms, 1.5 s, 2 min, 1.5 h."""
    if value == 0:
        return "0"
    if value < 1:
        return f"{value * 1000:.3g} ms"
    if value < 120:
        return f"{value:.3g} s"
    if value < 7200:
        return f"{value / 60:.3g} min"
    return f"{value / 3600:.3g} h"


def bucket_label(start: datetime, step_s: int) -> str:
    return f"{start:%Y-%m-%d %H:%M} UTC" if step_s < 3600 else f"{start:%Y-%m-%d %H}:00 UTC"


def _slot_width(count: int) -> float:
    return (WIDTH - LEFT - RIGHT) / max(count, 1)


def time_ticks(starts: Sequence[datetime], step_s: int) -> list[Tick]:
    """Ticks at the start of every 10th minute, or every 3rd hour (with the date at midnight)."""
    width = _slot_width(len(starts))
    ticks = []
    for i, start in enumerate(starts):
        x = round(LEFT + i * width, 1)
        if step_s < 3600 and start.minute % 10 == 0:
            ticks.append(Tick(x, f"{start:%H:%M}"))
        elif step_s >= 3600 and start.hour % 3 == 0:
            ticks.append(Tick(x, f"{start:%b %d}" if start.hour == 0 else f"{start:%H}:00"))
    return ticks


def _y(value: float, top: float) -> float:
    bottom = HEIGHT - BOTTOM
    return round(bottom - (bottom - TOP) * value / top, 1)


def _y_ticks(values: list[float], top: float, label: Callable[[float], str]) -> list[Tick]:
    return [Tick(_y(v, top), label(v)) for v in values]


def stacked_bars(
    id: str,
    title: str,
    starts: Sequence[datetime],
    step_s: int,
    series: Sequence[tuple[str, str, Sequence[float | None]]],
    *,
    y_label: str,
    label: Callable[[float], str] = count_label,
    whole: bool = True,
) -> Chart:
    """Bars per bucket, the series stacked in order from the axis up; `series` is
    (name, legend label, one value per bucket). A bucket without a value has no bar."""
    totals = [sum(values[i] or 0 for _, _, values in series) for i in range(len(starts))]
    top, tick_values = y_axis(max(totals, default=0), whole=whole)
    width = _slot_width(len(starts))
    bars = []
    for i, start in enumerate(starts):
        base = 0.0
        for name, legend, values in series:
            value = values[i]
            if not value:
                continue
            y_low, y_high = _y(base, top), _y(base + value, top)
            bars.append(
                Bar(
                    series=name,
                    x=round(LEFT + i * width + width * 0.1, 1),
                    y=y_high,
                    width=round(width * 0.8, 1),
                    height=round(y_low - y_high, 1),
                    value=value,
                    title=f"{bucket_label(start, step_s)}: {label(value)} {legend}",
                )
            )
            base += value
    return Chart(
        id=id,
        title=title,
        y_label=y_label,
        x_label="time (UTC)",
        x_ticks=time_ticks(starts, step_s),
        y_ticks=_y_ticks(tick_values, top, label),
        bars=bars,
        lines=[],
        legend=[(name, legend) for name, legend, _ in series],
        has_data=bool(bars),
    )


def line_chart(
    id: str,
    title: str,
    starts: Sequence[datetime],
    step_s: int,
    series: Sequence[tuple[str, str, Sequence[float | None]]],
    *,
    y_label: str,
    label: Callable[[float], str] = seconds_label,
    whole: bool = False,
) -> Chart:
    """A line per series through the middle of each bucket; None leaves a gap."""
    peak = max((v for _, _, values in series for v in values if v is not None), default=0.0)
    top, tick_values = y_axis(peak, whole=whole)
    width = _slot_width(len(starts))
    lines = []
    for name, legend, values in series:
        points: list[Point] = []
        paths: list[str] = []
        run: list[str] = []
        for i, (start, value) in enumerate(zip(starts, values, strict=True)):
            if value is None:
                if run:
                    paths.append(" ".join(run))
                run = []
                continue
            x, y = round(LEFT + (i + 0.5) * width, 1), _y(value, top)
            tip = f"{bucket_label(start, step_s)}: {legend} {label(value)}"
            points.append(Point(x, y, value, tip))
            run.append(f"{x},{y}")
        if run:
            paths.append(" ".join(run))
        lines.append(Line(series=name, paths=paths, points=points))
    return Chart(
        id=id,
        title=title,
        y_label=y_label,
        x_label="time (UTC)",
        x_ticks=time_ticks(starts, step_s),
        y_ticks=_y_ticks(tick_values, top, label),
        bars=[],
        lines=lines,
        legend=[(name, legend) for name, legend, _ in series],
        has_data=any(line.points for line in lines),
    )
