"""The verifier's summary (``trainguard verify-run``) as text or JSON.

Drawn through :func:`trainguard.render.render`, like every report.

Run ids, causes and alert messages come from the ledger, so every text line
goes through :func:`~trainguard.render.text.printable`; the JSON is ASCII.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from trainguard.explain.verifier.follow import Summary, Verdict
from trainguard.render.options import Options
from trainguard.render.text import printable

SCHEMA_VERSION = 1


def verdict_line(v: object) -> str:
    """One verdict, one line (progress on stderr, and the text report)."""
    assert isinstance(v, Verdict)
    span = f"steps {v.start}..{v.end - 1}"
    # Which sealed data the verdict is about, to hold against `data seal`'s digest.
    data = f"; data {', '.join(v.data)}" if v.data else ""
    if v.status == "matched":
        # What a signature covered when it matched: records past that were chained only.
        signed = (
            "no signed head covered them yet"
            if v.signed_through is None
            else f"signed through step {v.signed_through}"
        )
        return printable(f"{span}: matched ({v.seconds:.2f} s; {signed}){data}")
    where = f" at {v.step}" if v.step is not None else ""
    ranks = f" (rank {', '.join(map(str, v.ranks))})" if v.ranks else ""
    return printable(f"{span}: {v.status.upper()}{where}{ranks}: {v.cause}{data}")


def render_text(summary: Summary) -> str:
    s = summary
    lines = [
        f"trainguard verify-run: run {s.run_id}, verdicts in {s.run_id}/verify",
        f"segments seen {s.segments_seen}, recomputed {len(s.verdicts)} (rate {s.rate:g})"
        + ("" if s.finished else "; the run has not ended"),
        *_coverage(s),
        "",
        *(f"  {verdict_line(v)}" for v in s.verdicts),
        *(f"  {a.get('rule')} {a.get('message')}" for a in s.alerts),
        *(f"  not checked: {p}" for p in s.problems),
        *(f"  note: {n}" for n in s.notes),
        "",
        f"probability that a sabotage active in {s.fraction:.0%} of the segments so far "
        f"was recomputed at least once: {s.detection:.3f}",
        f"exit {s.exit_code()}",
    ]
    # Each entry is one line: printable() escapes whatever a ledger string holds.
    return "".join(printable(line) + "\n" for line in lines)


def _coverage(s: Summary) -> list[str]:
    """Every recorded step accounted for: segments by outcome, and what none covered."""
    if not s.coverage:
        return []
    seg = s.coverage.get("segments", {})
    gaps = s.coverage.get("uncovered", {})
    line = (
        f"segments recomputed {seg.get('recomputed', 0)}, skipped by the draw "
        f"{seg.get('skipped', 0)}, failed {seg.get('failed', 0)}; uncovered steps: "
    )
    line += "; ".join(f"rank {r}: {g}" for r, g in gaps.items()) if gaps else "none"
    return [line]


def render_json(summary: Summary, *, tool_version: str) -> str:
    data = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "trainguard", "version": tool_version},
        **asdict(summary),
        "detection_probability": summary.detection,
        "exit_code": summary.exit_code(),
    }
    return json.dumps(data, indent=2, ensure_ascii=True) + "\n"


def draw_text(summary: Summary, options: Options) -> str:
    return render_text(summary)


def draw_json(summary: Summary, options: Options) -> str:
    return render_json(summary, tool_version=options.tool_version)
