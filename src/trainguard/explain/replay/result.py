"""What a replay found: per segment, the first step whose records differ, and why.

The verdict: ``matched`` (exit 0) when every replayed step reproduced the
ledger bit for bit; ``diverged`` (exit 1) when a step or a checkpoint did not;
``not-comparable`` (exit 2) when a step diverged while a condition that must be
held equal for bit-exact replay (threads, versions, device) differed, so the
divergence proves nothing either way.  A checkpoint that does not match the
ledger is a divergence whatever the conditions: those are recorded bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from trainguard.findings import Finding, Severity
from trainguard.monitor.conditions import ConditionDiff
from trainguard.rules import finding

MATCHED, DIVERGED, NOT_COMPARABLE = "matched", "diverged", "not-comparable"
# The ledger replayed does not verify (explain/replay/trust.py): nothing was replayed,
# and nothing recorded in it can be vouched for.
UNVERIFIED = "ledger-unverified"
EXIT_CODES = {MATCHED: 0, DIVERGED: 1, NOT_COMPARABLE: 2, UNVERIFIED: 1}

# The order fields are listed in: the order they happen within a step.
FIELD_ORDER = (
    "record",
    "file",
    "run",
    "layout",
    "params",
    "optimizer-state",
    "carried",
    "carried-ledger",
    "carried-step",
    "carried-schedule",
    "dataset",
    "unrecorded",
    "order",
    "samples",
    "batch",
    "rng",
    "outside",
    "before",
    "loss",
    "grad_norm",
    "after",
    "optimizer",
    "lr",
)

# Sealed data (explain/replay/samples.py): the rule a step divergence is reported under
# when it involves these fields, the first in FIELD_ORDER winning; otherwise TG1510.
SAMPLE_RULES = {"dataset": "TG1522", "unrecorded": "TG1523", "order": "TG1521", "samples": "TG1520"}


def step_rule(fields: tuple[str, ...] | list[str]) -> str:
    return next(
        (SAMPLE_RULES[f] for f in FIELD_ORDER if f in SAMPLE_RULES and f in fields), "TG1510"
    )


@dataclass(frozen=True)
class FieldDiff:
    """One recorded value the replay did not reproduce."""

    field: str
    recorded: Any
    replayed: Any
    tensors: tuple[str, ...] = ()  # which tensors (or generators) differ, when known
    tensors_known: bool = True  # False: the ledger holds no per-tensor digests here

    @classmethod
    def of_carried(
        cls,
        field: str,
        expected: Mapping[str, Mapping[str, Any]],
        restored: Mapping[str, Mapping[str, Any]],
        names: list[str],
    ) -> FieldDiff:
        """The differing carried values ``names`` (``scheduler gamma``), each looked up
        in the parts (scheduler, hyper-parameters, ...) of both sides."""
        flat_a = {n: v for part in expected.values() for n, v in part.items()}
        flat_b = {n: v for part in restored.values() for n, v in part.items()}
        return cls(
            field,
            {n: flat_a.get(n) for n in names},
            {n: flat_b.get(n) for n in names},
            tuple(names),
        )


@dataclass(frozen=True)
class Divergence:
    """The first position where replay and ledger disagree.

    ``kind`` is ``"step"`` (the step's record differs) or ``"checkpoint"`` (the
    checkpoint that starts the segment differs from the ledger at its step).
    """

    step: int
    kind: str
    fields: tuple[FieldDiff, ...]
    cause: str
    alerts: tuple[str, ...] = ()  # the ledger's own alerts at this step

    def field(self, name: str) -> FieldDiff | None:
        return next((f for f in self.fields if f.field == name), None)


@dataclass
class Segment:
    """Steps ``start`` to ``end - 1``, replayed from the checkpoint at ``start``."""

    start: int
    end: int
    checkpoint: str | None  # the file it starts from; None: the entry's own initial state
    status: str = "skipped"  # matched, diverged, not-comparable, skipped
    steps: int = 0  # steps replayed
    seconds: float = 0.0  # wall time of the replay, restoring included
    recorded_seconds: float = 0.0  # the same steps' time in the original run (ledger)
    divergence: Divergence | None = None
    conditions: list[ConditionDiff] = field(default_factory=list)
    held: list[str] = field(default_factory=list)  # conditions replay set to the recorded ones
    notes: list[str] = field(default_factory=list)
    # Which checkpoint record (its BLAKE3) the segment starts from, when several were
    # recorded at its position; None: the last one saved there.
    blake3: str | None = None


@dataclass
class ReplayReport:
    ledger: str
    run_id: str
    rank: int
    mode: str  # "keyed" (the run's key was given) or "plain"
    start: int
    end: int
    segmented: bool
    segments: list[Segment] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The sealed datasets (digests) the run recorded reading over the range: which data
    # the verdict is about, to hold against the digest `trainguard data seal` printed.
    data: list[str] = field(default_factory=list)
    # The ledger's verification (explain/replay/trust.py): its breaks (rule, message), what
    # was verified in words, and the last step of this stream a verified signature covers.
    ledger_problems: list[tuple[str, str]] = field(default_factory=list)
    ledger_check: str = ""
    signed_through: int | None = None

    @property
    def first_divergence(self) -> Divergence | None:
        return next((s.divergence for s in self.segments if s.divergence is not None), None)

    @property
    def first_bad_segment(self) -> Segment | None:
        return next((s for s in self.segments if s.divergence is not None), None)

    @property
    def verdict(self) -> str:
        if self.ledger_problems:
            return UNVERIFIED
        statuses = {s.status for s in self.segments}
        if DIVERGED in statuses:
            return DIVERGED
        if NOT_COMPARABLE in statuses:
            return NOT_COMPARABLE
        return MATCHED

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.segments)

    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def covered(self) -> str:
        """What a "matched" vouches for, in words: which steps of which stream."""
        replayed = [(s.start, s.start + s.steps) for s in self.segments if s.steps]
        spans = ", ".join(f"{a}..{b - 1}" for a, b in replayed) or "none"
        signed = (
            "no verified signature covers them"
            if self.signed_through is None
            else f"signed through step {self.signed_through}"
        )
        return (
            f"steps {spans} of stream {self.rank} (rank {self.rank}) recomputed and compared "
            f"({self.mode} fingerprints); {signed}; other ranks' streams were compared only "
            "if replayed with --all-ranks"
        )

    def findings(self) -> list[Finding]:
        out = [
            finding(rule, f"the ledger does not verify: {message}", file=self.ledger)
            for rule, message in self.ledger_problems
        ]
        for s in self.segments:
            d = s.divergence
            if d is not None and d.kind == "checkpoint":
                out.append(
                    finding(
                        "TG1511",
                        f"checkpoint at step {d.step} ({s.checkpoint}) differs from the "
                        f"ledger: {d.cause}",
                        file=s.checkpoint or "",
                        evidence=_evidence(d),
                    )
                )
            elif d is not None and s.status == DIVERGED:
                out.append(
                    finding(
                        step_rule([f.field for f in d.fields]),
                        f"step {d.step} does not replay: {d.cause}",
                        file=s.checkpoint or "",
                        evidence=_evidence(d),
                    )
                )
            if s.conditions and s.end > s.start:  # conditions matter to steps only
                held = "; ".join(str(c) for c in s.conditions)
                if s.status == NOT_COMPARABLE and d is not None:
                    message = (
                        f"replay is not comparable: {held} (step {d.step} diverged, "
                        "which these differences can explain; the recorded conditions are "
                        "the run's own report: replay under them to tell)"
                    )
                else:
                    span = f"steps {s.start}..{s.end - 1}"
                    message = f"{span} replayed under other conditions: {held}"
                out.append(
                    finding(
                        "TG1512",
                        message,
                        file=s.checkpoint or "",
                        severity=Severity.MEDIUM if s.status == NOT_COMPARABLE else Severity.INFO,
                        evidence={c.name: f"{c.recorded} vs {c.replayed}" for c in s.conditions},
                    )
                )
        return out


def _evidence(d: Divergence) -> dict[str, str]:
    ev = {"step": str(d.step)}
    for f in d.fields:
        ev[f.field] = ", ".join(f.tensors) if f.tensors else f"{f.recorded} vs {f.replayed}"
    return ev


def report_to_dict(report: ReplayReport) -> dict[str, Any]:
    """The report as plain data (JSON), for a replay run in another process."""
    return asdict(report)


def report_from_dict(data: dict[str, Any]) -> ReplayReport:
    """The inverse of :func:`report_to_dict`."""

    def divergence(d: dict[str, Any] | None) -> Divergence | None:
        if d is None:
            return None
        fields = tuple(
            FieldDiff(
                f["field"], f["recorded"], f["replayed"], tuple(f["tensors"]), f["tensors_known"]
            )
            for f in d["fields"]
        )
        return Divergence(d["step"], d["kind"], fields, d["cause"], tuple(d["alerts"]))

    segments = [
        Segment(
            **{k: v for k, v in s.items() if k not in ("divergence", "conditions")},
            divergence=divergence(s["divergence"]),
            conditions=[ConditionDiff(**c) for c in s["conditions"]],
        )
        for s in data["segments"]
    ]
    plain = {k: v for k, v in data.items() if k not in ("segments", "ledger_problems")}
    problems = [(str(r), str(m)) for r, m in data.get("ledger_problems", [])]
    return ReplayReport(**plain, segments=segments, ledger_problems=problems)
