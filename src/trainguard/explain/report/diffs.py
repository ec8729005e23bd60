"""Checkpoint diffs for the run report: what changed in the weights around a flagged step.

Two sources of pairs: ``checkpoint`` records in the ledger (payload ``path``,
record ``step``), paired around each alert step (the last checkpoint before
it against the first at or after it), and pairs the user names (``--diff A
B``).  Each pair goes through :func:`trainguard.explain.diff.core.diff`, which scans
both files before reading a tensor.  Nothing here is allowed to sink the
report: a missing file, a refused file or a diff that fails becomes a note or
an error line on its pair.

Paths in the ledger were written by the monitored process.  With a checkpoint
folder given, only files inside it are opened (a recorded path is looked up
there, by its relative path or else by its file name).  When the record holds
the file's BLAKE3 digest (``watch/checkpoint.py`` writes one), the file is
hashed first: one that differs was changed after it was saved, and the pair
fails.
"""

from __future__ import annotations

import bisect
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from trainguard.findings import Finding, Severity

if TYPE_CHECKING:
    from trainguard.explain.diff.result import DiffSummary, TensorDiff

MAX_DIFFS = 6  # pairs diffed per report
MAX_CHECKPOINTS = 10_000  # checkpoint records read from the ledger
MAX_TENSORS_SHOWN = 12  # changed tensors listed per pair (the most changed first)
HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class CheckpointRef:
    step: int | None
    path: str
    blake3: str | None = None  # the digest recorded when it was saved


@dataclass(frozen=True)
class TensorChange:
    path: str
    status: str
    changed: int
    numel: int
    max_abs: float | None
    relative: float | None
    cosine: float | None


@dataclass
class CheckpointDiff:
    a: str
    b: str
    a_step: int | None
    b_step: int | None
    reason: str  # why this pair: the alert it explains, or "--diff"
    summary: DiffSummary | None = None  # None when the pair could not be diffed
    changed_tensors: int = 0
    tensors: list[TensorChange] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    error: str | None = None
    modified: list[str] = field(default_factory=list)  # files unlike their recorded digest

    @property
    def failed(self) -> bool:
        return bool(self.modified) or any(f.severity >= Severity.HIGH for f in self.findings)


def plan_pairs(
    checkpoints: list[CheckpointRef], alert_steps: list[tuple[int, str]]
) -> tuple[list[tuple[CheckpointRef, CheckpointRef, str]], list[str]]:
    """Pairs of recorded checkpoints around each alert step, and notes on the others.

    A checkpoint's step is its position (steps done).  An alert at step s saw a
    change made after position s began, so the pair is the last checkpoint
    before s and the first after it (or at s, when none is after: a checkpoint
    at s itself may have been saved on either side of the change).
    """
    ordered = sorted(
        {c.path: c for c in checkpoints if c.step is not None}.values(),
        key=lambda c: (c.step or 0, c.path),
    )
    positions = [c.step or 0 for c in ordered]
    pairs: list[tuple[CheckpointRef, CheckpointRef, str]] = []
    seen: set[tuple[str, str]] = set()
    unpaired: list[int] = []
    over = 0
    if not ordered:
        return pairs, []
    for step, what in alert_steps:
        lo = bisect.bisect_left(positions, step)
        hi = bisect.bisect_right(positions, step)
        after_i = hi if hi < len(ordered) else (lo if lo < len(ordered) else None)
        if lo == 0 or after_i is None:
            unpaired.append(step)
            continue
        before, after = ordered[lo - 1], ordered[after_i]
        if (before.path, after.path) in seen:
            continue
        if len(pairs) == MAX_DIFFS:
            over += 1
            continue
        seen.add((before.path, after.path))
        pairs.append((before, after, what))
    notes = []
    if unpaired:
        shown = ", ".join(str(s) for s in unpaired[:10]) + (" ..." if len(unpaired) > 10 else "")
        notes.append(
            f"{len(unpaired)} alert step(s) have no recorded checkpoint on both sides, "
            f"not diffed: {shown}"
        )
    if over:
        notes.append(f"{over} more checkpoint pairs not diffed (at most {MAX_DIFFS} per report)")
    return pairs, notes


def locate(path: str, checkpoint_dir: str | None) -> str | None:
    """The file to open for a recorded checkpoint path, or None if there is none."""
    if checkpoint_dir is None:
        return path if os.path.isfile(path) else None
    root = os.path.realpath(checkpoint_dir)
    candidates = [os.path.basename(path)]
    if not os.path.isabs(path):
        candidates.insert(0, path)
    for candidate in candidates:
        full = os.path.realpath(os.path.join(root, candidate))
        inside = os.path.commonpath([root, full]) == root
        if inside and os.path.isfile(full):
            return full
    return None


def diff_pair(
    a: str, b: str, a_step: int | None, b_step: int | None, reason: str
) -> CheckpointDiff:
    """One pair diffed; every failure is kept on the result, never raised."""
    from trainguard.errors import TrainguardError, UnsafeModelError
    from trainguard.explain.diff.core import diff

    result = CheckpointDiff(a, b, a_step, b_step, reason)
    try:
        report = diff(a, b)
    except UnsafeModelError as exc:
        result.error = f"refused: {exc}"
        result.findings = list(exc.findings)
        return result
    except (TrainguardError, OSError, ValueError, ImportError) as exc:
        result.error = f"could not diff: {exc}"
        return result
    result.summary = report.summary()
    result.findings = list(report.findings)
    changed = [t for t in report.tensors if t.status != "same"]
    result.changed_tensors = len(changed)

    def weight(t: TensorDiff) -> float:
        rel = t.relative
        return -1.0 if rel is None else (math.inf if math.isnan(rel) else rel)

    changed.sort(key=weight, reverse=True)
    result.tensors = [
        TensorChange(t.path, t.status, t.changed, t.numel, t.max_abs, t.relative, t.cosine)
        for t in changed[:MAX_TENSORS_SHOWN]
    ]
    return result


def checkpoint_diffs(
    checkpoints: list[CheckpointRef],
    alert_steps: list[tuple[int, str]],
    *,
    checkpoint_dir: str | None = None,
    explicit: list[tuple[str, str]] | None = None,
) -> tuple[list[CheckpointDiff], list[str]]:
    """Diffs for the pairs named by the user, then those around the alert steps."""
    diffs: list[CheckpointDiff] = []
    notes: list[str] = []
    for first, second in (explicit or [])[:MAX_DIFFS]:
        diffs.append(diff_pair(first, second, None, None, "--diff"))
    if explicit and len(explicit) > MAX_DIFFS:
        notes.append(f"only the first {MAX_DIFFS} --diff pairs were diffed")
    pairs, plan_notes = plan_pairs(checkpoints, alert_steps)
    notes.extend(plan_notes)
    for before, after, what in pairs:
        a, b = locate(before.path, checkpoint_dir), locate(after.path, checkpoint_dir)
        if a is None or b is None:
            missing = before.path if a is None else after.path
            where = f" in {checkpoint_dir}" if checkpoint_dir else ""
            notes.append(f"{what}: checkpoint {missing!r} not found{where}; not diffed")
            continue
        result = diff_pair(a, b, before.step, after.step, what)
        result.modified = [
            path for path, ref in ((a, before), (b, after)) if not _matches_record(path, ref)
        ]
        diffs.append(result)
    return diffs, notes


def _matches_record(path: str, ref: CheckpointRef) -> bool:
    """False when the ledger recorded a BLAKE3 digest and the file no longer has it."""
    if ref.blake3 is None:
        return True
    from blake3 import blake3

    h = blake3()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(HASH_CHUNK):
                h.update(chunk)
    except OSError:
        return False
    return h.hexdigest() == ref.blake3.lower()
