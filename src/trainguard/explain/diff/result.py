"""What ``trainguard diff`` finds: data only, drawn by :mod:`trainguard.render.diff`.

The comparison (:mod:`.core`) fills these and the forensic checks
(:mod:`.checks`, :mod:`.update`) read them, so they live apart from both.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from trainguard.findings import Finding, Severity


@dataclass
class TensorDiff:
    """One tensor path. ``status``: same, changed, added, removed, retyped, reshaped."""

    path: str
    status: str
    dtype_a: str | None = None
    dtype_b: str | None = None
    shape_a: tuple[int, ...] | None = None
    shape_b: tuple[int, ...] | None = None
    numel: int = 0
    changed: int = 0
    max_abs: float | None = None
    l2_diff: float | None = None
    l2_a: float | None = None
    l2_b: float | None = None
    cosine: float | None = None
    nonfinite_a: int = 0
    nonfinite_b: int = 0
    indices: list[int] = field(default_factory=list)  # the first changed flat indices

    @property
    def fraction(self) -> float:
        return self.changed / self.numel if self.numel else 0.0

    @property
    def relative(self) -> float | None:
        if self.l2_diff is None or self.l2_a is None:
            return None
        if self.l2_a == 0:
            return 0.0 if self.l2_diff == 0 else math.inf
        return self.l2_diff / self.l2_a


@dataclass
class ValueDiff:
    """A non-tensor entry (or a path that is a tensor on one side only)."""

    path: str
    status: str  # same, changed, added, removed
    a: str | None
    b: str | None


@dataclass(frozen=True)
class SideInfo:
    path: str
    format: str
    size: int
    tensors: int
    tensor_bytes: int
    streamed: bool


TENSOR_STATUSES = ("changed", "added", "removed", "retyped", "reshaped", "same")


@dataclass(frozen=True)
class DiffSummary:
    """A diff in counts: what its one-line summary says, for a renderer to word."""

    identical: bool
    tensors: dict[str, int]  # every status of TENSOR_STATUSES, zero counts included
    values_differ: int  # non-tensor entries not the same
    findings: dict[str, int]  # severity name -> count, highest first


@dataclass
class DiffReport:
    a: SideInfo
    b: SideInfo
    tensors: list[TensorDiff] = field(default_factory=list)
    values: list[ValueDiff] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fail_on: Severity = Severity.HIGH

    @property
    def identical(self) -> bool:
        return all(t.status == "same" for t in self.tensors) and all(
            v.status == "same" for v in self.values
        )

    def exit_code(self) -> int:
        """0 identical and nothing at or above ``fail_on``; 1 otherwise (like diff)."""
        worst = max((f.severity for f in self.findings), default=None)
        return 0 if self.identical and (worst is None or worst < self.fail_on) else 1

    def summary(self) -> DiffSummary:
        tensors = Counter(t.status for t in self.tensors)
        severities = Counter(Severity(f.severity) for f in self.findings)
        return DiffSummary(
            identical=self.identical,
            tensors={s: tensors[s] for s in TENSOR_STATUSES},
            values_differ=sum(1 for v in self.values if v.status != "same"),
            findings={str(s): n for s, n in sorted(severities.items(), reverse=True)},
        )
