"""``trainguard demo``: a shared checkpoint store with poisoned files, scanned.

The store is built from :mod:`trainguard.samples` (harmless payloads that would
only create a canary file) in a temporary folder; the scan is the real one.
The closing tally is computed from the report, never assumed.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from trainguard.findings import Severity
from trainguard.render import render
from trainguard.samples import Sample, missing_modules
from trainguard.scan import scan


def _pick(samples: Mapping[str, Sample], per_loader: int, expect: set[str]) -> list[Sample]:
    """A small, varied selection: a few samples for each way victims load files."""
    chosen: list[Sample] = []
    counts: dict[str, int] = {}
    for s in samples.values():
        if missing_modules(s) or s.expect not in expect:
            continue
        if counts.get(s.loader, 0) < per_loader:
            counts[s.loader] = counts.get(s.loader, 0) + 1
            chosen.append(s)
    return chosen


def build_store(root: Path) -> tuple[list[Path], list[Path]]:
    """Write the demo store under ``root``; return (clean files, poisoned files)."""
    from trainguard.samples import BENIGN, MALICIOUS

    canary = root.parent / "canary-never-created"
    clean_dir, shared_dir = root / "team-a", root / "shared"
    clean_dir.mkdir(parents=True, exist_ok=True)
    shared_dir.mkdir(parents=True, exist_ok=True)
    clean = [s.build(clean_dir, canary) for s in _pick(BENIGN, 2, {"clean", "low", "medium"})]
    # Planted files that run code or commands when loaded (medium-rated samples,
    # such as hidden template instructions, are left to the full test corpus).
    poisoned = [s.build(shared_dir, canary) for s in _pick(MALICIOUS, 1, {"critical", "high"})]
    return clean, poisoned


def run_demo(keep: str | None = None) -> int:
    err = sys.stderr
    with tempfile.TemporaryDirectory(prefix="trainguard-demo-") as tmp:
        root = Path(keep) if keep else Path(tmp) / "checkpoint-store"
        clean, poisoned = build_store(root)
        print(
            f"A shared checkpoint store in {root}:\n  {len(clean)} clean files in "
            f"team-a/, {len(poisoned)} planted in shared/ (harmless payloads).\n"
            f"$ cd {root} && trainguard scan .\n",
            file=err,
        )
        here = os.getcwd()
        os.chdir(root)  # relative paths keep the report readable
        try:
            report = scan(["."])
        finally:
            os.chdir(here)
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
        sys.stdout.write(render(report, "text", color=color))
        failing = {
            (root / r.path).resolve()
            for r in report.files
            if r.verdict is not None and r.verdict >= Severity.HIGH
        }
        caught = sum(p.resolve() in failing for p in poisoned)
        false_alarms = sum(p.resolve() in failing for p in clean)
        print(
            f"\ntrainguard flagged {caught}/{len(poisoned)} poisoned files and "
            f"{false_alarms}/{len(clean)} clean ones; nothing was loaded or executed.",
            file=err,
        )
        return 0 if caught == len(poisoned) and false_alarms == 0 else 1
