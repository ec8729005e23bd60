"""Line charts as inline SVG: no script, no font, no network, nothing but markup.

:func:`line_chart` draws one metric: a line per rank (colour and dash pattern
both differ, so the ranks stay apart in grey print and for colour-blind
readers), vertical marks at the steps of alerts and ledger breaks (each with
a ``<title>`` that a browser shows on hover and a screen reader reads), and
axes with round ticks.  The y axis turns logarithmic when a positive metric
spans three or more orders of magnitude, so one spike does not flatten the
rest.  The SVG carries ``role="img"`` with a title and a description that say
in words what the chart shows.

Every string that reaches the markup goes through :func:`~.html_page.esc`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from trainguard.render.html_page import esc

WIDTH, HEIGHT = 880, 220
LEFT, RIGHT, TOP, BOTTOM = 70, 16, 18, 34
# Okabe-Ito colours (red kept for alerts); dash patterns take over past seven ranks.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#000000", "#7f6a2c")
DASHES = ("", "7 3", "2 2", "9 3 2 3")
ALERT_COLOR = "#c00018"
BREAK_COLOR = "#6a1b9a"
BAR_COLOR = "#cc7700"
MAX_MARKS = 200  # distinct marked steps per chart; the rest are counted in the caption
LOG_RATIO = 1000.0  # a positive metric spanning this much gets a log axis
CLAMP = 1e100  # values beyond are drawn at the edge (floats near the limit overflow spans)


def style_of(index: int) -> tuple[str, str]:
    """(colour, dash pattern) of the index-th line."""
    return PALETTE[index % len(PALETTE)], DASHES[(index // len(PALETTE)) % len(DASHES)]


@dataclass(frozen=True)
class Line:
    label: str
    points: Sequence[tuple[int, float]]
    index: int  # picks the colour and dash pattern


@dataclass(frozen=True)
class Mark:
    step: int
    kind: str  # "alert" or "break"
    label: str


def _nice(span: float) -> float:
    """A round step (1, 2 or 5 times a power of ten) giving about five ticks over span."""
    raw = span / 5 if span > 0 else 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 5.0, 10.0):
        if raw <= m * power:
            return m * power
    return 10.0 * power


def _ticks(lo: float, hi: float) -> list[float]:
    step = _nice(hi - lo)
    first = math.ceil(lo / step) * step
    count = min(int((hi - first) / step + 1e-9) + 1, 20)
    return [first + i * step for i in range(max(count, 0))]


def _label(value: float, step: float | None = None) -> str:
    """A tick label with as many decimals as the tick spacing needs (none for log ticks)."""
    if value == 0:
        return "0"
    if abs(value) >= 1e6 or abs(value) < 1e-4:
        return f"{value:.0e}"
    if step is None or step >= 1:
        return f"{value:.6g}"
    decimals = min(12, max(0, -math.floor(math.log10(step) + 1e-9)))
    return f"{value:.{decimals}f}"


class _Axes:
    def __init__(self, x0: float, x1: float, y0: float, y1: float, log: bool) -> None:
        self.x0, self.x1 = (x0, x1) if x1 > x0 else (x0 - 1, x0 + 1)
        self.log = log
        if log:
            y0, y1 = math.log10(y0), math.log10(y1)
        if y1 <= y0:
            pad = abs(y0) * 0.05 or 1.0
            y0, y1 = y0 - pad, y1 + pad
        else:
            pad = (y1 - y0) * 0.05
            y0, y1 = y0 - pad, y1 + pad
        self.y0, self.y1 = y0, y1

    def x(self, step: float) -> float:
        width = WIDTH - LEFT - RIGHT
        return LEFT + (step - self.x0) / (self.x1 - self.x0) * width

    def y(self, value: float) -> float:
        v = math.log10(value) if self.log else value
        height = HEIGHT - TOP - BOTTOM
        return TOP + (1 - (v - self.y0) / (self.y1 - self.y0)) * height

    def y_ticks(self) -> list[float]:
        if not self.log:
            return _ticks(self.y0, self.y1)
        lo, hi = math.ceil(self.y0), math.floor(self.y1)
        stride = max(1, (hi - lo + 1) // 6 + 1)
        return [10.0**e for e in range(lo, hi + 1, stride)]


def _frame(axes: _Axes) -> list[str]:
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    out = [
        f'<rect x="{LEFT}" y="{TOP}" width="{right - LEFT}" height="{bottom - TOP}" '
        'fill="#ffffff" stroke="#888888"/>'
    ]
    for t in _ticks(axes.x0, axes.x1):
        x = axes.x(t)
        out.append(
            f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" stroke="#555"/>'
        )
        out.append(
            f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle" font-size="11">'
            f"{t:.0f}</text>"
        )
    y_ticks = axes.y_ticks()
    spacing = None if axes.log or len(y_ticks) < 2 else y_ticks[1] - y_ticks[0]
    for t in y_ticks:
        y = axes.y(t)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        out.append(
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">'
            f"{_label(t, spacing)}</text>"
        )
    out.append(f'<text x="{right}" y="{HEIGHT - 2}" text-anchor="end" font-size="11">step</text>')
    return out


def _marks(axes: _Axes, marks: Sequence[Mark]) -> tuple[list[str], int]:
    by_step: dict[tuple[int, str], list[str]] = {}
    for m in marks:
        by_step.setdefault((m.step, m.kind), []).append(m.label)
    out: list[str] = []
    keys = sorted(by_step)
    for step, kind in keys[:MAX_MARKS]:
        labels = by_step[(step, kind)]
        x = axes.x(step)
        color = ALERT_COLOR if kind == "alert" else BREAK_COLOR
        dash = "4 3" if kind == "alert" else "1 3"
        what = "alert" if kind == "alert" else "ledger break"
        more = f" (+{len(labels) - 3} more)" if len(labels) > 3 else ""
        tip = f"step {step}: {what}: " + "; ".join(labels[:3]) + more
        top = TOP if kind == "alert" else TOP + 8
        shape = (
            f"M{x - 5:.1f},{top - 8} L{x + 5:.1f},{top - 8} L{x:.1f},{top} Z"
            if kind == "alert"
            else f"M{x:.1f},{top - 9} L{x + 4:.1f},{top - 5} L{x:.1f},{top - 1} "
            f"L{x - 4:.1f},{top - 5} Z"
        )
        out.append(
            f'<g class="mark {kind}"><title>{esc(tip)}</title>'
            f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{HEIGHT - BOTTOM}" '
            f'stroke="{color}" stroke-width="1.5" stroke-dasharray="{dash}"/>'
            f'<path d="{shape}" fill="{color}"/></g>'
        )
    return out, max(0, len(keys) - MAX_MARKS)


def line_chart(
    chart_id: str,
    title: str,
    lines: Sequence[Line],
    marks: Sequence[Mark],
    steps: tuple[int, int],
    description: str,
) -> tuple[str, int]:
    """The SVG of one chart, and how many marked steps did not fit in it.

    ``chart_id`` must be markup-safe (it names the title and description).
    """
    lines = [
        Line(ln.label, [(s, max(-CLAMP, min(CLAMP, v))) for s, v in ln.points], ln.index)
        for ln in lines
    ]
    values = [v for line in lines for _, v in line.points]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    log = lo > 0 and hi / lo >= LOG_RATIO
    axes = _Axes(steps[0], steps[1], lo, hi, log)
    scale = " (log scale)" if log else ""
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-labelledby="{chart_id}-t {chart_id}-d" class="chart">',
        f'<title id="{chart_id}-t">{esc(title + scale)}</title>',
        f'<desc id="{chart_id}-d">{esc(description)}</desc>',
        *_frame(axes),
    ]
    # Marks first, so that a spike at a marked step stays visible on top of its mark.
    drawn, dropped = _marks(axes, marks)
    parts.extend(drawn)
    for line in lines:
        color, dash = style_of(line.index)
        coords = " ".join(f"{axes.x(s):.1f},{axes.y(v):.1f}" for s, v in line.points)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        if len(line.points) == 1:
            (s, v) = line.points[0]
            parts.append(
                f'<circle cx="{axes.x(s):.1f}" cy="{axes.y(v):.1f}" r="2.5" fill="{color}"/>'
            )
        elif line.points:
            parts.append(
                f'<polyline class="series" fill="none" stroke="{color}" stroke-width="1.6"'
                f'{dash_attr} stroke-linejoin="round" points="{coords}">'
                f"<title>{esc(line.label)}</title></polyline>"
            )
    parts.append("</svg>")
    return "\n".join(parts), dropped


def swatch(index: int) -> str:
    """A short sample of the index-th line, for a legend."""
    color, dash = style_of(index)
    dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="28" height="10" aria-hidden="true">'
        f'<line x1="0" y1="5" x2="28" y2="5" stroke="{color}" stroke-width="2.5"{dash_attr}/>'
        "</svg>"
    )


def mark_swatch(kind: str) -> str:
    color = ALERT_COLOR if kind == "alert" else BREAK_COLOR
    dash = "4 3" if kind == "alert" else "1 3"
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="12" height="14" aria-hidden="true">'
        f'<line x1="6" y1="0" x2="6" y2="14" stroke="{color}" stroke-width="2" '
        f'stroke-dasharray="{dash}"/></svg>'
    )


def fraction_bar(fraction: float, width: int = 60) -> str:
    """A horizontal bar ``fraction`` of ``width`` long, for a table cell.

    SVG attributes, not an inline ``style``: the pages' policy allows no style attribute.
    """
    filled = max(1, round(width * min(1.0, max(0.0, fraction)))) if fraction > 0 else 0
    return (
        f'<svg class="bar" width="{width}" height="8" aria-hidden="true">'
        f'<rect width="{width}" height="8" fill="#eeeeee"/>'
        f'<rect width="{filled}" height="8" fill="{BAR_COLOR}"/></svg>'
    )
