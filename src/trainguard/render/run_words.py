"""The words the run report's text and HTML share: verdict, summaries, times and numbers.

Returned as plain text; each renderer escapes it its own way (the terminal
through :func:`~trainguard.render.text.printable`, HTML through
:func:`~trainguard.render.html_page.esc`).
"""

from __future__ import annotations

import math
import time
from collections import Counter

from trainguard.explain.report.build import AlertGroup, RunReport, first_alerts
from trainguard.findings import Severity

MODIFIED = "is not the file the ledger recorded: it was changed after it was saved"
METRIC_NAMES = {"loss": "loss", "grad_norm": "gradient norm", "step_time": "step time (s)"}


def utc(t: float | None) -> str:
    if t is None:
        return "?"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
    except (OverflowError, OSError, ValueError):
        return "?"


def num(x: float | None, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    return format(x, spec) if math.isfinite(x) else str(x)


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def alert_summary(report: RunReport) -> str:
    if not report.alerts_total:
        return "no alerts"
    levels = Counter(str(a.level) for a in report.alerts)
    order = [str(s) for s in sorted(Severity, reverse=True)]
    parts = ", ".join(f"{levels[s]} {s}" for s in order if levels[s])
    return f"{plural(report.alerts_total, 'alert')} ({parts})" if parts else "alerts"


def ledger_summary(report: RunReport) -> str:
    v = report.verification
    if not v.intact:
        tally = Counter(f.rule for f in v.breaks)
        return "ledger verification FAILED: " + ", ".join(
            f"{n}x {rule}" for rule, n in sorted(tally.items())
        )
    if v.signatures_checked:
        signed = f"{plural(v.signed_heads, 'signed head')} verified"
    elif v.heads_present:
        signed = f"{plural(v.heads_present, 'signed head')} present, signatures not checked (--key)"
    else:
        signed = "no signed heads"
    return f"ledger intact ({plural(v.records, 'record')}, {signed})"


def verdict(report: RunReport) -> str:
    word = "FAIL" if report.failed else "OK"
    diffs = [d for d in report.diffs if d.failed]
    extra = f"; {plural(len(diffs), 'failing checkpoint diff')}" if diffs else ""
    return f"{word}: {alert_summary(report)}; {ledger_summary(report)}{extra}"


def run_summary(report: RunReport) -> str:
    info = report.info
    span = report.steps
    parts = [f"steps {span[0]}..{span[1]}" if span else "no steps recorded"]
    ranks = len(report.timelines) + len(report.ranks_not_plotted)
    parts.append(f"{plural(ranks, 'rank')}" + (f" of {info.world_size}" if info.world_size else ""))
    if info.optimizer:
        parts.append(info.optimizer)
    if info.params is not None:
        parts.append(f"{info.params:,} parameters")
    if info.torch:
        parts.append(f"torch {info.torch}")
    if info.start_time is not None and info.end_time is not None:
        parts.append(f"{utc(info.start_time)}, {num(info.end_time - info.start_time, '.1f')} s")
    if not info.ended:
        parts.append("no run-end record (still running, or killed)")
    return "; ".join(parts)


def environment_summary(report: RunReport) -> str:
    env = report.environment
    snap = f" (snapshot {env.snapshot})" if env.snapshot else ""
    return f"{env.state}{snap}: {env.detail}"


def first_alert_line(report: RunReport) -> str:
    """``start here: step 25 (TG1304 ..., TG1306 ...)``: the earliest alert step."""
    step, alerts = first_alerts(report)
    if step is None:
        return ""
    rules = ", ".join(dict.fromkeys(f"{a.rule} {a.title}".strip() for a in alerts))
    return (
        f"start here: the first alert is at step {step} ({rules}); the steps before it raised none"
    )


def group_steps(g: AlertGroup) -> str:
    """``12`` or ``12-40``: the steps a group of identical alerts covers."""
    if g.first.step is None:
        return "-"
    if g.count == 1 or g.last_step == g.first.step:
        return str(g.first.step)
    return f"{g.first.step}-{g.last_step}"
