"""A checkpoint diff as text (rich), JSON, or a page of :mod:`.html_page`.

Tensor paths and values come from the checkpoints, so they are attacker-chosen:
the text goes through :func:`~trainguard.render.text.printable`, the HTML
through :func:`~trainguard.render.html_page.esc`, and the JSON is ASCII.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from typing import TYPE_CHECKING

from trainguard.explain.diff.result import DiffReport, DiffSummary, SideInfo, TensorDiff
from trainguard.findings import Severity
from trainguard.render.html_page import esc, fact_list, findings_table, page
from trainguard.render.html_svg import fraction_bar
from trainguard.render.jsonfmt import finding_dict
from trainguard.render.options import Options
from trainguard.render.text import SEVERITY_STYLE, WIDTH, printable

if TYPE_CHECKING:
    from rich.text import Text

SCHEMA_VERSION = 1
TEXT_MAX_ROWS = 200  # more changed tensors than this: the JSON and HTML list them all


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


def summary_line(summary: DiffSummary) -> str:
    """``differ: tensors 2 changed, 10 same; 0 other entries differ; 1 high``."""
    c = summary.tensors
    parts = [f"{c[s]} {s}" for s in ("changed", "added", "removed", "retyped", "reshaped") if c[s]]
    parts.append(f"{c['same']} same")
    found = ", ".join(f"{n} {s}" for s, n in summary.findings.items()) or "no findings"
    verdict = "identical" if summary.identical else "differ"
    return (
        f"{verdict}: tensors {', '.join(parts)}; {summary.values_differ} other entries differ; "
        f"{found}"
    )


# -- text ----------------------------------------------------------------------------


def _side_text(label: str, s: SideInfo) -> Text:
    from rich.text import Text

    t = Text(f"{label}: ", style="bold")
    t.append(printable(s.path))
    how = "streamed" if s.streamed else "loaded whole"
    t.append(
        f"  {printable(s.format)}, {s.size:,} bytes, {s.tensors} tensors "
        f"({s.tensor_bytes:,} bytes, {how})",
        style="dim",
    )
    return t


def render_text(report: DiffReport, *, color: bool = False, show_all: bool = False) -> str:
    # rich loads only here: the run report's text and JSON use this module's words too.
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

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
            grid.add_row(
                Text(str(sev), style=SEVERITY_STYLE[sev]), printable(f.rule), printable(f.message)
            )
        console.print(grid)
    for note in report.notes:
        console.print(Text(f"note: {printable(note)}", style="dim"))
    console.print(Text(summary_line(report.summary()), style="bold"))
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


def _tensor_rows(rows: list[TensorDiff]) -> str:
    out = []
    for t in rows:
        changed = f"{fraction_bar(t.fraction)}{t.changed:,} ({t.fraction:.2%})" if t.changed else ""
        out.append(
            f"<tr><td><code>{esc(t.path or '(root)')}</code></td>"
            f'<td class="st-{esc(t.status)}">{esc(t.status)}</td><td>{esc(_shape(t))}</td>'
            f'<td class="n">{changed}</td><td class="n">{esc(_num(t.max_abs))}</td>'
            f'<td class="n">{esc(_num(t.l2_diff))}</td><td class="n">{esc(_num(t.relative))}</td>'
            f'<td class="n">{esc(_num(t.cosine, ".5f"))}</td></tr>'
        )
    return "".join(out)


def render_html(report: DiffReport, *, tool_version: str, show_all: bool = True) -> str:
    sides = []
    for label, s in (("A", report.a), ("B", report.b)):
        how = "streamed" if s.streamed else "loaded whole"
        sides.append(
            (
                label,
                f"<code>{esc(s.path)}</code> {esc(s.format)}, {s.size:,} bytes, "
                f"{s.tensors} tensors ({s.tensor_bytes:,} bytes, {how})",
            )
        )
    state = "ok" if report.exit_code() == 0 else "fail"
    body = [
        "<header><h1>trainguard diff</h1>",
        f'<p class="verdict {state}" role="status">{esc(summary_line(report.summary()))}</p>',
        fact_list(sides),
        "</header><main>",
    ]
    if report.findings:
        body += [
            '<section aria-labelledby="findings-h"><h2 id="findings-h">Findings</h2>',
            findings_table(report.findings, "What training could not have done", evidence=True),
            "</section>",
        ]
    rows = [t for t in report.tensors if show_all or t.status != "same"]
    body.append(
        '<section aria-labelledby="tensors-h"><h2 id="tensors-h">Tensors</h2><table>'
        "<thead><tr><th scope='col'>Tensor</th><th scope='col'>Status</th>"
        "<th scope='col'>dtype/shape</th><th scope='col'>Changed</th><th scope='col'>Max |d|</th>"
        "<th scope='col'>L2 d</th><th scope='col'>Relative</th><th scope='col'>Cosine</th></tr>"
        f"</thead><tbody>{_tensor_rows(rows)}</tbody></table></section>"
    )
    values = [v for v in report.values if show_all or v.status != "same"]
    if values:
        cells = "".join(
            f"<tr><td><code>{esc(v.path or '(root)')}</code></td>"
            f'<td class="st-{esc(v.status)}">{esc(v.status)}</td>'
            f"<td><code>{esc(v.a or '')}</code></td><td><code>{esc(v.b or '')}</code></td></tr>"
            for v in values
        )
        body.append(
            '<section aria-labelledby="values-h"><h2 id="values-h">Other entries</h2><table>'
            "<thead><tr><th scope='col'>Path</th><th scope='col'>Status</th><th scope='col'>A"
            f"</th><th scope='col'>B</th></tr></thead><tbody>{cells}</tbody></table></section>"
        )
    body += [f'<p class="note">note: {esc(n)}</p>' for n in report.notes]
    body += ["</main>", f"<footer><p>Generated by trainguard {esc(tool_version)}.</p></footer>"]
    return page("trainguard diff", body)


def draw_text(report: DiffReport, options: Options) -> str:
    return render_text(report, color=options.color, show_all=options.show_all)


def draw_json(report: DiffReport, options: Options) -> str:
    return render_json(report, tool_version=options.tool_version)


def draw_html(report: DiffReport, options: Options) -> str:
    # The page lists every tensor whatever show_all says: it is searchable and sortable by eye.
    return render_html(report, tool_version=options.tool_version)
