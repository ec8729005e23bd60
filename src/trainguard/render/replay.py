"""A replay report as text (for terminals and CI logs) or JSON (:func:`trainguard.render.render`).

Tensor names, file names and alert messages come from the ledger and the
checkpoints, so they are written through :func:`~trainguard.render.text.printable`
in text; the JSON is ASCII.
"""

from __future__ import annotations

import json
import math
from typing import Any

from trainguard.explain.replay.result import (
    DIVERGED,
    MATCHED,
    UNVERIFIED,
    Divergence,
    FieldDiff,
    ReplayReport,
    Segment,
)
from trainguard.render.jsonfmt import finding_dict
from trainguard.render.options import Options
from trainguard.render.text import printable

SCHEMA_VERSION = 1
MAX_TENSORS_TEXT = 12  # more differing tensors than this: the JSON lists them all

# How each recorded field is named in the text report.
FIELD_TEXT = {
    "record": "step record in the ledger",
    "file": "checkpoint file",
    "run": "checkpoint of another run or step",
    "layout": "tensor names",
    "params": "parameters restored from the checkpoint",
    "optimizer-state": "optimizer state restored from the checkpoint",
    "carried": "carried state (vs replaying the segment before)",
    "carried-ledger": "carried state (vs the ledger's record of the save)",
    "carried-step": "random states (vs the last step's record: segment before not replayed)",
    "carried-schedule": "schedule, hyper-parameters (vs the entry's, stepped to the count)",
    "dataset": "sealed dataset (manifest digest)",
    "unrecorded": "samples (not recorded by the run)",
    "order": "sample order (vs the sampler's seed)",
    "samples": "samples (vs the sealed dataset)",
    "batch": "batch",
    "rng": "random states after forward/backward",
    "outside": "declared windows (guard.outside_step)",
    "before": "parameters before the optimizer step",
    "loss": "loss",
    "grad_norm": "gradient norm",
    "after": "parameters after the optimizer step",
    "optimizer": "optimizer state after the step",
    "lr": "learning rate",
}

MODE_TEXT = {
    "keyed": "keyed (the run's key was given: exact, and unforgeable without the key)",
    "plain": "plain (no key given: unkeyed sums, exact for honest replay, but someone "
    "who edits weights on purpose can keep them equal; pass --key-file)",
}


# -- text ---------------------------------------------------------------------------------


def _seconds(x: float) -> str:
    return f"{x:.2f} s" if x < 100 else f"{x:.0f} s"


def _span(s: Segment) -> str:
    return f"{s.start}..{s.end - 1}" if s.end > s.start else f"at {s.start}"


def _segment_line(s: Segment) -> str:
    source = printable(s.checkpoint) if s.checkpoint else "(entry's initial state)"
    steps = f"{s.steps}/{s.end - s.start}"
    if s.status == MATCHED and s.end == s.start:
        status = "matched     (the checkpoint the range ends at)"
    elif s.status == MATCHED:
        status = f"matched     {_seconds(s.seconds)} (training: {_seconds(s.recorded_seconds)})"
    elif s.divergence is not None:
        where = "checkpoint" if s.divergence.kind == "checkpoint" else "step"
        status = f"{s.status.upper()} at {where} {s.divergence.step}"
    else:
        status = "not replayed"
    return f"  {_span(s):<12} {source:<28} {steps:>8}  {status}"


def _tensors(f: FieldDiff) -> str:
    if not f.tensors_known:
        return "(which tensors: not recorded in the ledger)"
    if not f.tensors:
        return "(group digest differs; no single tensor's digest does)"
    names = [printable(n) for n in f.tensors[:MAX_TENSORS_TEXT]]
    more = len(f.tensors) - MAX_TENSORS_TEXT
    return ", ".join(names) + (f" and {more} more" if more > 0 else "")


def _field_line(f: FieldDiff) -> str:
    label = FIELD_TEXT.get(f.field, f.field)
    if f.field in ("before", "after", "optimizer", "params", "optimizer-state"):
        what = _tensors(f)
    elif f.field == "rng":
        what = "generators " + ", ".join(f.tensors)
    elif f.field in (
        "carried",
        "carried-ledger",
        "carried-step",
        "carried-schedule",
        "order",
        "samples",
        "unrecorded",
    ):
        # values are in the cause and the JSON; the samples' names are the evidence
        what = ", ".join(printable(n) for n in f.tensors)
    else:
        what = f"recorded {_value(f.recorded)}, replayed {_value(f.replayed)}"
    return f"    {label:<46} {what}"


def _value(v: Any) -> str:
    return printable(repr(v) if isinstance(v, float) else str(v))


def _divergence_lines(seg: Segment, d: Divergence) -> list[str]:
    where = "the checkpoint at step" if d.kind == "checkpoint" else "step"
    head = f"{seg.status.upper()} at {where} {d.step}"
    if d.kind == "step":
        head += f" (segment {_span(seg)}"
        head += f", from {printable(seg.checkpoint)})" if seg.checkpoint else ")"
    lines = [head, f"  cause: {printable(d.cause)}", "  differs:"]
    lines += [_field_line(f) for f in d.fields]
    if d.alerts:
        lines.append(f"  the ledger's own alerts at step {d.step}:")
        lines += [f"    {printable(a)}" for a in d.alerts[:10]]
    return lines


def _stepped(r: ReplayReport) -> int:
    return sum(1 for s in r.segments if s.end > s.start)


def render_text(report: ReplayReport) -> str:
    r = report
    if r.verdict == UNVERIFIED:
        return _unverified_text(r)
    lines = [
        f"trainguard replay: run {printable(r.run_id)} (rank {r.rank}) in {printable(r.ledger)}",
        f"ledger: {printable(r.ledger_check)}",
        f"fingerprints: {MODE_TEXT.get(r.mode, r.mode)}",
        f"steps {r.start}..{r.end - 1}"
        + (f" in {_stepped(r)} segments, each from its checkpoint" if r.segmented else ""),
        "",
        f"  {'steps':<12} {'from':<28} {'replayed':>8}  status",
    ]
    lines += [_segment_line(s) for s in r.segments]
    held = sorted({h for s in r.segments for h in s.held})
    if held:
        lines += ["", "set to the recorded conditions: " + "; ".join(held)]
    for s in r.segments:
        if s.conditions and s.end > s.start:
            lines.append(
                f"steps {_span(s)}: conditions differ from the recorded run: "
                + "; ".join(printable(str(c)) for c in s.conditions)
            )
    bad = r.first_bad_segment
    if bad is not None and bad.divergence is not None:
        lines += ["", *_divergence_lines(bad, bad.divergence)]
    notes = r.notes + [n for s in r.segments for n in s.notes if s is bad or s.status != "skipped"]
    if notes:
        lines += ["", *(f"note: {printable(n)}" for n in dict.fromkeys(notes))]
    findings = r.findings()
    if findings:
        lines.append("")
        lines += [f"{f.rule} {f.severity}: {printable(f.message)}" for f in findings]
    trained = sum(s.recorded_seconds for s in r.segments)
    if r.data:  # which data the verdict is about (pin it: --expect-data)
        lines += [
            "",
            *(
                f"data: sealed dataset {printable(d)}... (the digest's start the run recorded)"
                for d in r.data
            ),
        ]
    lines += [
        "",
        f"replayed {r.steps} step(s) in {_seconds(sum(s.seconds for s in r.segments))}; "
        f"the same steps took {_seconds(trained)} in training (ledger step times)",
        _verdict_line(r),
    ]
    if r.verdict == MATCHED:
        lines.append(f"matched covers: {r.covered()}")
    # Each entry is one line, whatever it holds: printable() (idempotent) also catches a
    # name a line forgot to escape, so none can add a line or move the cursor.
    return "".join(printable(line) + "\n" for line in lines)


def _unverified_text(r: ReplayReport) -> str:
    lines = [
        f"trainguard replay: run {printable(r.run_id)} (rank {r.rank}) in {printable(r.ledger)}",
        f"ledger: {printable(r.ledger_check)}",
        "",
        *(f"{rule} high: {printable(message)}" for rule, message in r.ledger_problems),
        "",
        "verdict: the ledger does not verify: nothing was replayed, and no step it records "
        "can be vouched for (exit 1; `trainguard ledger verify` lists every break)",
    ]
    if any(rule in ("TG1211", "TG1212") for rule, _ in r.ledger_problems):
        # A run still running (or killed) has no end yet: say how to replay it anyway.
        lines.append(
            "hint: a run that is still running, or was killed, has no end: replay it with "
            "--live (the report then names the steps no signature covers)"
        )
    return "".join(printable(line) + "\n" for line in lines)


def _verdict_line(r: ReplayReport) -> str:
    if r.verdict == MATCHED:
        return "verdict: matched: every replayed step reproduced the ledger bit for bit (exit 0)"
    d = r.first_divergence
    step = f" at step {d.step}" if d is not None else ""
    if r.verdict == DIVERGED:
        return f"verdict: diverged{step} (exit 1)"
    reasons = "; ".join(str(c) for s in r.segments for c in s.conditions)
    return f"verdict: replay is not comparable: {printable(reasons)}; diverged{step} (exit 2)"


# -- JSON ---------------------------------------------------------------------------------


def _finite(v: Any) -> Any:
    """NaN and infinities (a diverged loss) as text: JSON has no such numbers."""
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def _field_dict(f: FieldDiff) -> dict[str, Any]:
    return {
        "field": f.field,
        "recorded": _finite(f.recorded),
        "replayed": _finite(f.replayed),
        "tensors": list(f.tensors),
        "tensors_known": f.tensors_known,
    }


def _divergence_dict(d: Divergence | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {
        "step": d.step,
        "kind": d.kind,
        "cause": d.cause,
        "fields": [_field_dict(f) for f in d.fields],
        "ledger_alerts": list(d.alerts),
    }


def _segment_dict(s: Segment) -> dict[str, Any]:
    return {
        "start": s.start,
        "end": s.end,
        "checkpoint": s.checkpoint,
        "status": s.status,
        "steps_replayed": s.steps,
        "seconds": round(s.seconds, 6),
        "recorded_seconds": round(s.recorded_seconds, 6),
        "divergence": _divergence_dict(s.divergence),
        "conditions": [
            {"name": c.name, "recorded": c.recorded, "replayed": c.replayed} for c in s.conditions
        ],
        "held": s.held,
        "notes": s.notes,
    }


def report_dict(r: ReplayReport, *, tool_version: str) -> dict[str, Any]:
    bad = r.first_bad_segment
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "trainguard", "version": tool_version},
        "ledger": r.ledger,
        "run_id": r.run_id,
        "rank": r.rank,
        "mode": r.mode,
        "start": r.start,
        "end": r.end,
        "segmented": r.segmented,
        "verdict": r.verdict,
        "exit_code": r.exit_code(),
        "first_divergence": _divergence_dict(r.first_divergence),
        "first_bad_segment": [bad.start, bad.end] if bad is not None else None,
        "segments": [_segment_dict(s) for s in r.segments],
        "findings": [finding_dict(f, f.file) for f in r.findings()],
        "notes": r.notes,
        "data": r.data,
        "ledger_check": r.ledger_check,
        "ledger_problems": [{"rule": a, "message": b} for a, b in r.ledger_problems],
        "signed_through": r.signed_through,
        "covered": r.covered() if r.verdict == MATCHED else None,
    }


def render_json(report: ReplayReport, *, tool_version: str) -> str:
    text = json.dumps(report_dict(report, tool_version=tool_version), indent=2, allow_nan=False)
    return text + "\n"


def draw_text(report: ReplayReport, options: Options) -> str:
    return render_text(report)


def draw_json(report: ReplayReport, options: Options) -> str:
    return render_json(report, tool_version=options.tool_version)
