"""The demo's shared checkpoint store with planted files, scanned (act 1).

The store is built from :mod:`trainguard.samples` (harmless payloads that would
only create a canary file) in a temporary folder; the scan is the real one.
The closing tally is computed from the report, never assumed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from trainguard.findings import Severity
from trainguard.render import render
from trainguard.samples import Sample, missing_modules
from trainguard.scanner import scan


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


def scan_store(root: Path, show: Callable[[str], None]) -> bool:
    """Act 1: build the store under ``root`` and scan it; True if every planted file
    fails the scan and no clean one does."""
    clean, poisoned = build_store(root)
    show(
        f"{len(clean)} clean files in team-a/, {len(poisoned)} planted in shared/ "
        "(each would run code when loaded; the payloads only create a canary file)\n"
    )
    show("$ trainguard scan store/")
    here = os.getcwd()
    os.chdir(root.parent)  # relative paths keep the report readable
    try:
        report = scan([root.name])
    finally:
        os.chdir(here)
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    show(render(report, "text", color=color).rstrip("\n"))
    failing = {
        (root.parent / r.path).resolve()
        for r in report.files
        if r.verdict is not None and r.verdict >= Severity.HIGH
    }
    caught = sum(p.resolve() in failing for p in poisoned)
    false_alarms = sum(p.resolve() in failing for p in clean)
    show(
        f"\n=> flagged {caught}/{len(poisoned)} planted files and {false_alarms}/{len(clean)} "
        "clean ones; nothing was loaded or executed."
    )
    return caught == len(poisoned) and false_alarms == 0
