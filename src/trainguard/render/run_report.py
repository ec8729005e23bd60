"""A :class:`~trainguard.explain.report.build.RunReport` as text or JSON (the HTML page is
:mod:`trainguard.render.html_report`; :func:`trainguard.render.render` picks the format).

The text is a compact summary for terminals and CI logs: sparklines of the
timeline with the alert steps under them, the alerts with their evidence, the
ledger's verification, the environment and the checkpoint diffs.  Every string
from the ledger goes through :func:`~trainguard.render.text.printable`; the
JSON is ASCII; the HTML (:mod:`trainguard.render.html_report`) escapes all of it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

from trainguard.explain.report.build import METRICS, RunReport, group_alerts
from trainguard.findings import Severity
from trainguard.render.diff import summary_line
from trainguard.render.jsonfmt import finding_dict
from trainguard.render.options import Options
from trainguard.render.run_words import (
    METRIC_NAMES,
    MODIFIED,
    environment_summary,
    first_alert_line,
    group_steps,
    ledger_summary,
    num,
    plural,
    run_summary,
    verdict,
)
from trainguard.render.text import printable

SCHEMA_VERSION = 1
SPARK_WIDTH = 48
SPARKS = "▁▂▃▄▅▆▇█"


def _p(text: object) -> str:
    return printable(str(text))


# -- text ----------------------------------------------------------------------------
def _columns(report: RunReport, metric: str) -> list[float | None]:
    span = report.steps
    cols: list[float | None] = [None] * SPARK_WIDTH
    if span is None:
        return cols
    lo, hi = span
    for line in report.timelines:
        for step, value in line.metrics[metric].points():
            i = _column(step, lo, hi)
            current = cols[i]
            cols[i] = value if current is None else max(current, value)
    return cols


def _column(step: int, lo: int, hi: int) -> int:
    if hi <= lo:
        return 0
    return min(SPARK_WIDTH - 1, max(0, (step - lo) * SPARK_WIDTH // (hi - lo + 1)))


def sparkline(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return ""
    lo, hi = min(known), max(known)
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        elif hi == lo or not math.isfinite(hi - lo):
            out.append(SPARKS[0])
        else:
            out.append(SPARKS[min(len(SPARKS) - 1, int((v - lo) / (hi - lo) * len(SPARKS)))])
    return "".join(out)


def _timeline_text(report: RunReport) -> list[str]:
    lines: list[str] = []
    for metric in METRICS:
        series = [t.metrics[metric] for t in report.timelines if t.metrics[metric].count]
        if not series:
            continue
        lows = [s.lowest for s in series if s.lowest is not None]
        highs = [s.highest for s in series if s.highest is not None]
        nonfinite = sum(s.nonfinite for s in series)
        bad = f", {nonfinite} not finite" if nonfinite else ""
        lines.append(
            f"  {METRIC_NAMES[metric]:<14} {sparkline(_columns(report, metric))}  "
            f"{num(min(lows))} .. {num(max(highs))}{bad}"
        )
    span = report.steps
    if span and lines and report.markers:
        row = [" "] * SPARK_WIDTH
        for m in report.markers:
            i = _column(m.step, *span)
            row[i] = "x" if m.kind == "break" or row[i] == "x" else "!"
        lines.append(f"  {'marks':<14} {''.join(row)}  (! alert, x ledger break)")
    return lines


def render_text(report: RunReport) -> str:
    out = [
        f"trainguard report: run {_p(report.run_id)}",
        f"  ledger  {_p(report.ledger)}: {plural(report.verification.records, 'record')} in "
        f"{plural(report.verification.streams, 'stream')}",
        f"  run     {_p(run_summary(report))}",
    ]
    if report.info.error:
        out.append(f"  error   {_p(report.info.error)}")
    out += _timeline_text(report)
    if report.alerts:
        out += ["", f"alerts ({report.alerts_total}):"]
        start = first_alert_line(report)
        if start:
            out.append(f"  {_p(start)}")
    for g in group_alerts(report.alerts):
        a = g.first
        where = f"step {group_steps(g)} rank {a.rank}"
        repeated = f" ({g.count} alerts, one per step)" if g.count > 1 else ""
        tampered = "  [record fails verification]" if not a.intact else ""
        out.append(f"  {_p(a.severity):<8} {_p(a.rule)} {_p(a.title)}  {where}{repeated}{tampered}")
        out.append(f"           {_p(a.message)}")
        for name, value in a.evidence:
            out.append(f"           {_p(name)}: {_p(value)}")
    v = report.verification
    out += ["", _p(ledger_summary(report))]
    for f in sorted(v.findings, key=lambda f: -f.severity):
        where = f"{f.member}" + ("" if f.offset is None else f" seq {f.offset}")
        out.append(f"  {Severity(f.severity)!s:<8} {f.rule} {_p(where)}: {_p(f.message)}")
    if v.key_ids:
        out.append(f"  head key ids: {_p(', '.join(k[:16] for k in v.key_ids))}")
    out.append(f"environment {_p(environment_summary(report))}")
    out += _diffs_text(report)
    out += [f"note: {_p(n)}" for n in report.notes]
    out += ["", verdict(report)]
    # Each entry is one line, whatever it holds: printable() (idempotent) also catches a
    # ledger string a line forgot to escape, so no name can add a line or move the cursor.
    return "".join(printable(line) + "\n" for line in out)


def _diffs_text(report: RunReport) -> list[str]:
    if not report.diffs:
        recorded = plural(report.checkpoints, "checkpoint record")
        return [f"checkpoints {recorded}; no diff (--diff A B to compare two)"]
    out = [f"checkpoint diffs ({len(report.diffs)}):"]
    for d in report.diffs:
        steps = f" (steps {d.a_step} -> {d.b_step})" if d.a_step is not None else ""
        out.append(f"  {_p(d.reason)}: {_p(d.a)} -> {_p(d.b)}{steps}")
        for path in d.modified:
            out.append(f"    MODIFIED: {_p(path)} {MODIFIED}")
        if d.error:
            out.append(f"    {_p(d.error)}")
        else:
            out.append(f"    {_p(summary_line(d.summary)) if d.summary else ''}")
        for t in d.tensors:
            out.append(
                f"    {_p(t.path or '(root)')}: {t.status}, {t.changed:,}/{t.numel:,} elements, "
                f"max|d| {num(t.max_abs, '.3g')}, relative {num(t.relative, '.3g')}"
            )
        for f in sorted(d.findings, key=lambda f: -f.severity):
            out.append(f"    {Severity(f.severity)!s:<8} {f.rule} {_p(f.message)}")
    return out


# -- JSON ----------------------------------------------------------------------------
def _clean(value: Any) -> Any:
    """JSON has no inf or NaN: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def report_dict(report: RunReport, *, tool_version: str) -> dict[str, object]:
    v = report.verification
    document: dict[str, object] = _clean(
        {
            "tool": "trainguard",
            "version": tool_version,
            "schema": SCHEMA_VERSION,
            "kind": "run-report",
            "run_id": report.run_id,
            "ledger": report.ledger,
            "generated": report.generated,
            "exit_code": report.exit_code(),
            "verdict": verdict(report),
            "run": asdict(report.info),
            "steps": list(report.steps) if report.steps else None,
            "timeline": {
                str(t.rank): {
                    m: {
                        "points": t.metrics[m].points(),
                        "count": t.metrics[m].count,
                        "nonfinite": t.metrics[m].nonfinite,
                        "nonfinite_steps": t.metrics[m].nonfinite_steps,
                    }
                    for m in METRICS
                }
                for t in report.timelines
            },
            "ranks_not_plotted": report.ranks_not_plotted,
            "alerts_total": report.alerts_total,
            "alert_rules": report.alert_rules,
            "alerts": [asdict(a) for a in report.alerts],
            "verification": {
                "intact": v.intact,
                "records": v.records,
                "streams": v.streams,
                "signatures_checked": v.signatures_checked,
                "key_source": v.key_source,  # given (--key), run (from run-start) or none
                "signed_heads": v.signed_heads,
                "heads_present": v.heads_present,
                "key_ids": v.key_ids,
                "findings": [finding_dict(f, report.ledger) for f in v.findings],
            },
            "environment": asdict(report.environment),
            "checkpoint_records": report.checkpoints,
            "checkpoint_diffs": [
                {
                    **{k: val for k, val in asdict(d).items() if k != "findings"},
                    "summary": summary_line(d.summary) if d.summary else "",
                    "findings": [finding_dict(f, d.b) for f in d.findings],
                }
                for d in report.diffs
            ],
            "notes": report.notes,
        }
    )
    return document


def render_json(report: RunReport, *, tool_version: str) -> str:
    document = report_dict(report, tool_version=tool_version)
    return json.dumps(document, indent=1, ensure_ascii=True) + "\n"


def draw_text(report: RunReport, options: Options) -> str:
    return render_text(report)


def draw_json(report: RunReport, options: Options) -> str:
    return render_json(report, tool_version=options.tool_version)
