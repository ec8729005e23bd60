"""The verifier's summary (``trainguard verify-run``) as text or JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from trainguard.explain.verifier.follow import Summary, Verdict
from trainguard.render.text import printable

SCHEMA_VERSION = 1


def verdict_line(v: Any) -> str:
    """One verdict, one line (progress on stderr, and the text report)."""
    assert isinstance(v, Verdict)
    span = f"steps {v.start}..{v.end - 1}"
    if v.status == "matched":
        return f"{span}: matched ({v.seconds:.2f} s)"
    where = f" at {v.step}" if v.step is not None else ""
    ranks = f" (rank {', '.join(map(str, v.ranks))})" if v.ranks else ""
    return f"{span}: {v.status.upper()}{where}{ranks}: {printable(v.cause)}"


def render(summary: Summary, fmt: str, *, tool_version: str) -> str:
    if fmt == "json":
        data = {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "trainguard", "version": tool_version},
            **asdict(summary),
            "detection_probability": summary.detection,
            "exit_code": summary.exit_code(),
        }
        return json.dumps(data, indent=2) + "\n"
    if fmt != "text":
        raise ValueError(f"unknown verifier report format {fmt!r} (expected: text, json)")
    s = summary
    lines = [
        f"trainguard verify-run: run {printable(s.run_id)}, verdicts in "
        f"{printable(s.run_id)}/verify",
        f"segments seen {s.segments_seen}, recomputed {len(s.verdicts)} (rate {s.rate:g})"
        + ("" if s.finished else "; the run has not ended"),
        "",
        *(f"  {verdict_line(v)}" for v in s.verdicts),
        *(f"  {a['rule']} {printable(str(a['message']))}" for a in s.alerts),
        "",
        f"probability that a sabotage active in {s.fraction:.0%} of the segments so far "
        f"was recomputed at least once: {s.detection:.3f}",
        f"exit {s.exit_code()}",
    ]
    return "\n".join(lines) + "\n"
