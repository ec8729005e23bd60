"""A checkpoint diff as text (rich), JSON, or one self-contained offline HTML page.

Tensor paths and values come from the checkpoints, so they are attacker-chosen:
the text goes through :func:`~trainguard.render.text.printable`, the HTML
through :func:`html.escape`, and the JSON is ASCII.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from collections import Counter

from rich.console import Console
from rich.table import Table
from rich.text import Text

from trainguard.explain.diff.result import DiffReport, SideInfo, TensorDiff
from trainguard.findings import Severity
from trainguard.render.jsonfmt import finding_dict
from trainguard.render.text import SEVERITY_STYLE, WIDTH, printable

SCHEMA_VERSION = 1
TEXT_MAX_ROWS = 200  # more changed tensors than this: the JSON and HTML list them all
FORMATS = ("text", "json", "html")


def _num(x: float | None, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return format(x, spec)


def _shape(t: TensorDiff) -> str:
    a = f"{t.dtype_a}{list(t.shape_a)}" if t.shape_a is not None else None
    b = f"{t.dtype_b}{list(t.shape_b)}" if t.shape_b is not None else None
    if a and b and a != b:
        return f"{a} -> {b}"
    return a or b or ""


def _counts(report: DiffReport) -> Counter[str]:
    return Counter(t.status for t in report.tensors)


def summary_line(report: DiffReport) -> str:
    c = _counts(report)
    parts = [f"{c[s]} {s}" for s in ("changed", "added", "removed", "retyped", "reshaped") if c[s]]
    parts.append(f"{c['same']} same")
    values = sum(1 for v in report.values if v.status != "same")
    findings = Counter(str(Severity(f.severity)) for f in report.findings)
    found = ", ".join(f"{n} {s}" for s, n in findings.items()) or "no findings"
    verdict = "identical" if report.identical else "differ"
    return f"{verdict}: tensors {', '.join(parts)}; {values} other entries differ; {found}"


# -- text ----------------------------------------------------------------------------


def _side_text(label: str, s: SideInfo) -> Text:
    t = Text(f"{label}: ", style="bold")
    t.append(printable(s.path))
    how = "streamed" if s.streamed else "loaded whole"
    t.append(
        f"  {s.format}, {s.size:,} bytes, {s.tensors} tensors ({s.tensor_bytes:,} bytes, {how})",
        style="dim",
    )
    return t


def render_text(report: DiffReport, *, color: bool = False, show_all: bool = False) -> str:
    out = io.StringIO()
    console = Console(
        file=out,
        width=WIDTH,
        force_terminal=color,
        color_system="standard" if color else None,
        no_color=not color,
        force_jupyter=False,
        markup=False,
        emoji=False,
        highlight=False,
    )
    console.print(_side_text("A", report.a))
    console.print(_side_text("B", report.b))
    rows = [t for t in report.tensors if show_all or t.status != "same"]
    if rows:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for name, justify in (
            ("tensor", "left"),
            ("status", "left"),
            ("dtype/shape", "left"),
            ("changed", "right"),
            ("max|d|", "right"),
            ("rel", "right"),
            ("cos", "right"),
        ):
            table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
        for t in rows[:TEXT_MAX_ROWS]:
            changed = f"{t.changed:,} ({t.fraction:.1%})" if t.status == "changed" else ""
            table.add_row(
                printable(t.path or "(root)"),
                t.status,
                printable(_shape(t)),
                changed,
                _num(t.max_abs),
                _num(t.relative),
                _num(t.cosine, ".4f"),
            )
        console.print(table)
        if len(rows) > TEXT_MAX_ROWS:
            console.print(f"... {len(rows) - TEXT_MAX_ROWS} more; --format json lists them all")
    values = [v for v in report.values if show_all or v.status != "same"]
    for v in values[:TEXT_MAX_ROWS]:
        line = Text(f"{v.status:8} ", style="bold")
        line.append(printable(v.path or "(root)"))
        line.append(f": {printable(v.a or '-')[:120]} -> {printable(v.b or '-')[:120]}")
        console.print(line)
    if report.findings:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(no_wrap=True, min_width=len("critical"))
        grid.add_column(no_wrap=True)
        grid.add_column(overflow="fold")
        for f in sorted(report.findings, key=lambda f: f.severity, reverse=True):
            sev = Severity(f.severity)
            grid.add_row(Text(str(sev), style=SEVERITY_STYLE[sev]), f.rule, printable(f.message))
        console.print(grid)
    for note in report.notes:
        console.print(Text(f"note: {printable(note)}", style="dim"))
    console.print(Text(summary_line(report), style="bold"))
    # Grids pad rows to their widest one; drop the padding before any closing style codes.
    return re.sub(r" +(?=(?:\x1b\[[0-9;]*m)*$)", "", out.getvalue(), flags=re.MULTILINE)


# -- JSON ----------------------------------------------------------------------------


def _tensor_dict(t: TensorDiff) -> dict[str, object]:
    def clean(x: float | None) -> float | str | None:
        if x is None or math.isfinite(x):
            return x
        return str(x)  # JSON has no inf/nan

    return {
        "path": t.path,
        "status": t.status,
        "dtype": [t.dtype_a, t.dtype_b],
        "shape": [
            list(t.shape_a) if t.shape_a else t.shape_a,
            list(t.shape_b) if t.shape_b else t.shape_b,
        ],
        "numel": t.numel,
        "changed": t.changed,
        "fraction_changed": t.fraction,
        "max_abs_diff": clean(t.max_abs),
        "l2_diff": clean(t.l2_diff),
        "l2_a": clean(t.l2_a),
        "l2_b": clean(t.l2_b),
        "relative_change": clean(t.relative),
        "cosine": clean(t.cosine),
        "nonfinite": [t.nonfinite_a, t.nonfinite_b],
        "changed_indices": t.indices[:64],
    }


def report_dict(report: DiffReport, *, tool_version: str) -> dict[str, object]:
    return {
        "tool": "trainguard",
        "version": tool_version,
        "schema": SCHEMA_VERSION,
        "kind": "diff",
        "a": vars(report.a),
        "b": vars(report.b),
        "identical": report.identical,
        "exit_code": report.exit_code(),
        "summary": {
            "tensors": dict(sorted(_counts(report).items())),
            "values_differ": sum(1 for v in report.values if v.status != "same"),
            "findings": len(report.findings),
        },
        "findings": [finding_dict(f, report.b.path) for f in report.findings],
        "notes": report.notes,
        "tensors": [_tensor_dict(t) for t in report.tensors],
        "values": [vars(v) for v in report.values],
    }


def render_json(report: DiffReport, *, tool_version: str) -> str:
    return (
        json.dumps(report_dict(report, tool_version=tool_version), indent=2, ensure_ascii=True)
        + "\n"
    )


# -- HTML ----------------------------------------------------------------------------

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,monospace;word-break:break-all}
.critical{background:#b00;color:#fff}.high{color:#b00;font-weight:bold}
.medium{color:#a60}.low{color:#068}.info{color:#777}
.changed{color:#a60}.added{color:#070}.removed{color:#b00}.retyped,.reshaped{color:#606}
.bar{display:inline-block;height:8px;background:#c70;vertical-align:middle}
.note{color:#666}.verdict{font-weight:bold}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def render_html(report: DiffReport, *, tool_version: str, show_all: bool = True) -> str:
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'\">",
        f"<title>trainguard diff</title><style>{_CSS}</style></head><body>",
        "<h1>trainguard diff</h1>",
    ]
    for label, s in (("A", report.a), ("B", report.b)):
        how = "streamed" if s.streamed else "loaded whole"
        parts.append(
            f"<p><b>{label}</b> <code>{_e(s.path)}</code> {_e(s.format)}, {s.size:,} bytes, "
            f"{s.tensors} tensors ({s.tensor_bytes:,} bytes, {how})</p>"
        )
    parts.append(f"<p class=verdict>{_e(summary_line(report))}</p>")
    if report.findings:
        parts.append("<h2>Findings</h2><table><tr><th>severity<th>rule<th>where<th>what")
        for f in sorted(report.findings, key=lambda f: f.severity, reverse=True):
            sev = str(Severity(f.severity))
            ev = "; ".join(f"{k}={v}" for k, v in sorted(f.evidence.items()))
            parts.append(
                f"<tr><td class={sev}>{sev}<td>{_e(f.rule)}<td><code>{_e(f.member)}</code>"
                f"<td>{_e(f.message)}<br><small>{_e(ev)}</small>"
            )
        parts.append("</table>")
    rows = [t for t in report.tensors if show_all or t.status != "same"]
    parts.append(
        "<h2>Tensors</h2><table><tr><th>tensor<th>status<th>dtype/shape<th>changed"
        "<th>max |d|<th>L2 d<th>relative<th>cosine"
    )
    for t in rows:
        width = max(1, round(60 * t.fraction)) if t.changed else 0
        bar = f'<span class=bar style="width:{width}px"></span> ' if width else ""
        changed = f"{bar}{t.changed:,} ({t.fraction:.2%})" if t.changed else ""
        parts.append(
            f"<tr><td><code>{_e(t.path or '(root)')}</code><td class={_e(t.status)}>"
            f"{_e(t.status)}<td>{_e(_shape(t))}<td class=n>{changed}<td class=n>"
            f"{_num(t.max_abs)}<td class=n>{_num(t.l2_diff)}<td class=n>{_num(t.relative)}"
            f"<td class=n>{_num(t.cosine, '.5f')}"
        )
    parts.append("</table>")
    values = [v for v in report.values if show_all or v.status != "same"]
    if values:
        parts.append("<h2>Other entries</h2><table><tr><th>path<th>status<th>A<th>B")
        for v in values:
            parts.append(
                f"<tr><td><code>{_e(v.path or '(root)')}</code><td class={_e(v.status)}>"
                f"{_e(v.status)}<td><code>{_e(v.a or '')}</code><td><code>{_e(v.b or '')}</code>"
            )
        parts.append("</table>")
    for note in report.notes:
        parts.append(f"<p class=note>note: {_e(note)}</p>")
    parts.append(f"<p class=note>trainguard {_e(tool_version)}</p></body></html>\n")
    return "\n".join(parts)


def render(
    report: DiffReport, fmt: str, *, tool_version: str, color: bool = False, show_all: bool = False
) -> str:
    if fmt == "text":
        return render_text(report, color=color, show_all=show_all)
    if fmt == "json":
        return render_json(report, tool_version=tool_version)
    if fmt == "html":
        return render_html(report, tool_version=tool_version)
    raise ValueError(f"unknown diff format {fmt!r} (expected one of: {', '.join(FORMATS)})")
