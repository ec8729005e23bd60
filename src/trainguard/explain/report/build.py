"""``trainguard report RUN``: one run's story, read from its ledger.

:func:`build_report` reads the run twice: once through
:func:`~trainguard.ledger.verify.verify_run` (every record re-hashed, every link
and signed head checked), then once to gather the timeline (loss, gradient
norm and step time per rank, thinned by :mod:`.series`), the alerts
with their evidence, the run's start and end, the environment check and the
checkpoints.  The result is a :class:`RunReport`, plain data that the
renderers (:mod:`trainguard.render.run_report`, :mod:`trainguard.render.html_report`) draw.

Everything in a ledger was written by the monitored process, which may be
hostile: values of the wrong type are skipped and counted, strings are clipped
here and escaped by each renderer, and every list is capped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainguard.explain.report.diffs import MAX_CHECKPOINTS, CheckpointDiff, CheckpointRef
from trainguard.explain.report.series import Series
from trainguard.findings import Finding, Severity
from trainguard.rules import RULES

if TYPE_CHECKING:
    from trainguard.ledger import Ledger, Record

METRICS = ("loss", "grad_norm", "step_time")
MAX_RANKS_PLOTTED = 16
MAX_ALERTS_LISTED = 500
MAX_MARKERS = 2000  # (step, rank) marks kept for alerts and ledger breaks
MAX_TEXT_CHARS = 2000  # messages and other free text from the ledger
MAX_VALUE_CHARS = 300  # one evidence or run-info value
MAX_EVIDENCE_ITEMS = 20
MAX_KEY_IDS = 5
_STREAM_OF_MEMBER = re.compile(r" stream (-?\d+)$")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def clip(value: object, limit: int = MAX_VALUE_CHARS) -> str:
    """A ledger value as bounded text (containers as compact JSON)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple) and all(
        isinstance(v, str | int | float) and not isinstance(v, bool) for v in value
    ):
        text = ", ".join(str(v) for v in value[:MAX_EVIDENCE_ITEMS])
        if len(value) > MAX_EVIDENCE_ITEMS:
            text += f", ... ({len(value)} in all)"
    elif isinstance(value, dict | list | tuple):
        text = json.dumps(value, ensure_ascii=False, default=str)[: limit + 1]
    else:
        text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def number(value: object) -> float | None:
    """A payload value as a float, or None when it is not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


@dataclass(frozen=True)
class AlertEntry:
    step: int | None
    rank: int
    seq: int
    rule: str
    title: str  # the rule's name when trainguard knows the id
    severity: str  # a Severity name, or what the record said if it is not one
    message: str
    evidence: list[tuple[str, str]]
    intact: bool  # False when verification flagged this very record

    @property
    def level(self) -> Severity:
        try:
            return Severity.parse(self.severity)
        except ValueError:
            return Severity.HIGH  # an alert of unknown severity is still an alert


@dataclass(frozen=True)
class AlertGroup:
    """Alerts that say the same thing at consecutive steps, shown once.

    Sabotage that persists (a patched function, a flipped clip) raises the same
    alert at every step; a person needs its first step and how long it went on.
    """

    first: AlertEntry
    last_step: int | None
    count: int


def group_alerts(alerts: list[AlertEntry]) -> list[AlertGroup]:
    """Alerts in order, each run of identical ones (rule, rank, severity, message) at
    consecutive steps merged; a record that fails verification is never merged."""
    groups: list[AlertGroup] = []
    open_at: dict[tuple[str, int, str, str], int] = {}
    for a in alerts:
        key = (a.rule, a.rank, a.severity, a.message)
        i = open_at.get(key)
        if i is not None and a.intact and a.step is not None:
            g = groups[i]
            if g.first.intact and g.last_step is not None and a.step - g.last_step in (0, 1):
                groups[i] = AlertGroup(g.first, a.step, g.count + 1)
                continue
        open_at[key] = len(groups)
        groups.append(AlertGroup(a, a.step, 1))
    return groups


def first_alerts(report: RunReport) -> tuple[int | None, list[AlertEntry]]:
    """The earliest step with an alert, and its alerts: where to start looking."""
    stepped = [a for a in report.alerts if a.step is not None]
    if not stepped:
        return None, []
    first = min(a.step for a in stepped if a.step is not None)
    return first, [a for a in stepped if a.step == first]


@dataclass
class RankTimeline:
    rank: int
    metrics: dict[str, Series] = field(default_factory=lambda: {m: Series() for m in METRICS})
    steps: int = 0
    first_step: int | None = None
    last_step: int | None = None
    skipped_values: int = 0  # present but not numbers


@dataclass
class Verification:
    records: int
    streams: int
    signatures_checked: bool
    signed_heads: int  # heads whose signature verified (0 without a key)
    heads_present: int
    key_ids: list[str]
    findings: list[Finding]
    # What the heads were checked with: "given" (--key), "run" (the run keys the
    # run-start records name, ledger/runkey.py) or "none".
    key_source: str = "given"

    @property
    def breaks(self) -> list[Finding]:
        return [f for f in self.findings if f.severity >= Severity.HIGH]

    @property
    def intact(self) -> bool:
        return not self.breaks


@dataclass
class EnvironmentStatus:
    state: str  # "matches", "differs" or "not checked"
    snapshot: str | None = None
    files: list[str] = field(default_factory=list)
    detail: str = ""


@dataclass
class RunInfo:
    start_time: float | None = None
    end_time: float | None = None
    world_size: int | None = None
    optimizer: str | None = None
    params: int | None = None
    torch: str | None = None
    steps_reported: int | None = None  # by the run-end record(s)
    ended: bool = False
    error: str | None = None


@dataclass(frozen=True)
class Marker:
    step: int
    rank: int
    kind: str  # "alert" or "break"
    label: str
    severity: Severity


@dataclass
class RunReport:
    run_id: str
    ledger: str
    generated: float
    info: RunInfo
    timelines: list[RankTimeline]
    ranks_not_plotted: list[int]
    alerts: list[AlertEntry]
    alerts_total: int
    alert_rules: dict[str, int]
    markers: list[Marker]
    verification: Verification
    environment: EnvironmentStatus
    checkpoints: int
    diffs: list[CheckpointDiff] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return (
            self.alerts_total > 0
            or not self.verification.intact
            or self.environment.state == "differs"
            or any(d.failed for d in self.diffs)
        )

    def exit_code(self) -> int:
        """0: no alert, the ledger verified, the environment not seen to differ, no failing
        checkpoint diff; 1 otherwise."""
        return 1 if self.failed else 0

    @property
    def steps(self) -> tuple[int, int] | None:
        firsts = [t.first_step for t in self.timelines if t.first_step is not None]
        lasts = [t.last_step for t in self.timelines if t.last_step is not None]
        return (min(firsts), max(lasts)) if firsts and lasts else None


class _Collector:
    """The second pass: one record at a time, every list capped."""

    def __init__(self, flagged: set[tuple[int, int]]) -> None:
        self.flagged = flagged
        self.info = RunInfo()
        self.timelines: dict[int, RankTimeline] = {}
        self.unplotted: set[int] = set()
        self.alerts: list[AlertEntry] = []
        self.alerts_total = 0
        self.alert_rules: Counter[str] = Counter()
        self.markers: list[Marker] = []
        self.markers_dropped = 0
        self.heads = 0
        self.key_ids: list[str] = []
        self.checkpoints: list[CheckpointRef] = []
        self.environment: dict[str, Any] | None = None
        self.env_alerts: list[AlertEntry] = []
        self.env_files: list[str] = []

    def feed(self, r: Record) -> None:
        info = self.info
        if math.isfinite(r.time):
            info.start_time = r.time if info.start_time is None else min(info.start_time, r.time)
            info.end_time = r.time if info.end_time is None else max(info.end_time, r.time)
        broken = (r.stream, r.seq) in self.flagged
        if broken and r.step is not None:
            self.mark(
                Marker(r.step, r.stream, "break", f"ledger record {r.kind}", Severity.CRITICAL)
            )
        handler = _HANDLERS.get(r.kind)
        if handler is not None:
            handler(self, r, not broken)

    def mark(self, marker: Marker) -> None:
        if len(self.markers) < MAX_MARKERS:
            self.markers.append(marker)
        else:
            self.markers_dropped += 1

    def on_step(self, r: Record, intact: bool) -> None:
        if r.stream < 0 or r.step is None:
            return
        line = self.timelines.get(r.stream)
        if line is None:
            if len(self.timelines) >= MAX_RANKS_PLOTTED:
                self.unplotted.add(r.stream)
                return
            line = self.timelines[r.stream] = RankTimeline(r.stream)
        line.steps += 1
        line.first_step = r.step if line.first_step is None else min(line.first_step, r.step)
        line.last_step = r.step if line.last_step is None else max(line.last_step, r.step)
        for name in METRICS:
            raw = r.payload.get(name)
            value = number(raw)
            if value is not None:
                line.metrics[name].add(r.step, value)
            elif raw is not None:
                line.skipped_values += 1

    def on_alert(self, r: Record, intact: bool) -> None:
        self.alerts_total += 1
        p = r.payload
        rule_id = clip(p.get("rule", "?"), 40)
        self.alert_rules[rule_id] += 1
        known = RULES.get(rule_id)
        severity = p.get("severity")
        if not isinstance(severity, str) or not severity:
            severity = str(known.severity) if known else "unknown"
        evidence = p.get("evidence")
        items = sorted(evidence.items())[:MAX_EVIDENCE_ITEMS] if isinstance(evidence, dict) else []
        entry = AlertEntry(
            step=r.step,
            rank=r.stream,
            seq=r.seq,
            rule=rule_id,
            title=known.title if known else "",
            severity=clip(severity, 40),
            message=clip(p.get("message", ""), MAX_TEXT_CHARS),
            evidence=[(clip(k, 80), clip(v)) for k, v in items],
            intact=intact,
        )
        if rule_id == "TG1312":
            self.env_alerts.append(entry)
            files = evidence.get("files") if isinstance(evidence, dict) else None
            if isinstance(files, list):
                self.env_files = [clip(f) for f in files[:MAX_EVIDENCE_ITEMS]]
        if len(self.alerts) < MAX_ALERTS_LISTED:
            self.alerts.append(entry)
        if r.step is not None:
            self.mark(Marker(r.step, r.stream, "alert", f"{rule_id} {entry.title}", entry.level))

    def on_alert_repeats(self, r: Record, intact: bool) -> None:
        """The repeats the guard folded into one alert (monitor/sink.py): one entry each,
        so that grouping and counts read as if every occurrence had its own record."""
        p = r.payload
        steps = p.get("steps")
        if not isinstance(steps, list):
            return
        alert = {k: p.get(k) for k in ("rule", "severity", "message")}
        for step in steps[:MAX_ALERTS_LISTED]:
            if isinstance(step, int):
                self.on_alert(dataclasses.replace(r, step=step, payload=alert), intact)

    def on_run_start(self, r: Record, intact: bool) -> None:
        p, info = r.payload, self.info
        if info.optimizer is None or r.stream == 0:
            world = number(p.get("world_size"))
            params = number(p.get("params"))
            info.world_size = int(world) if world is not None and math.isfinite(world) else None
            info.params = int(params) if params is not None and math.isfinite(params) else None
            info.optimizer = clip(p["optimizer"], 80) if "optimizer" in p else None
            info.torch = clip(p["torch"], 80) if "torch" in p else None
        env = p.get("environment")
        if isinstance(env, dict) and self.environment is None:
            self.environment = env

    def on_run_end(self, r: Record, intact: bool) -> None:
        self.info.ended = True
        steps = number(r.payload.get("steps"))
        if steps is not None and math.isfinite(steps):
            done = int(steps)
            prior = self.info.steps_reported
            self.info.steps_reported = done if prior is None else max(prior, done)
        error = r.payload.get("error")
        if error is not None and self.info.error is None:
            self.info.error = f"rank {r.stream}: {clip(error, MAX_TEXT_CHARS)}"

    def on_head(self, r: Record, intact: bool) -> None:
        self.heads += 1
        key = r.payload.get("key_id")
        if isinstance(key, str) and key not in self.key_ids and len(self.key_ids) < MAX_KEY_IDS:
            self.key_ids.append(clip(key, 80))

    def on_checkpoint(self, r: Record, intact: bool) -> None:
        path, digest = r.payload.get("path"), r.payload.get("blake3")
        if isinstance(path, str) and path and len(self.checkpoints) < MAX_CHECKPOINTS:
            recorded = digest if isinstance(digest, str) and _HEX64.fullmatch(digest) else None
            self.checkpoints.append(CheckpointRef(r.step, clip(path, 4096), recorded))

    def environment_status(self) -> EnvironmentStatus:
        env = self.environment
        snapshot = clip(env.get("snapshot", ""), 200) if env is not None else None
        if self.env_alerts:
            alert = self.env_alerts[0]
            return EnvironmentStatus("differs", snapshot or None, self.env_files, alert.message)
        differing = number(env.get("differing")) if env is not None else None
        if differing:
            # The check found files, but their TG1312 alert is not in the ledger.
            detail = f"{differing:.0f} file(s) differed at start-up; their alert record is missing"
            return EnvironmentStatus("differs", snapshot or None, [], detail)
        if env is not None:
            return EnvironmentStatus(
                "matches", snapshot or None, [], "checked against the sealed snapshot at start-up"
            )
        return EnvironmentStatus(
            "not checked",
            detail="the run was not started with env_snapshot= (run `trainguard env verify`)",
        )


_HANDLERS: dict[str, Callable[[_Collector, Record, bool], None]] = {
    "step": _Collector.on_step,
    "alert": _Collector.on_alert,
    "alert-repeats": _Collector.on_alert_repeats,
    "run-start": _Collector.on_run_start,
    "run-end": _Collector.on_run_end,
    "head": _Collector.on_head,
    "checkpoint": _Collector.on_checkpoint,
}


def _flagged_records(findings: list[Finding]) -> set[tuple[int, int]]:
    """(stream, seq) of each record that verification found broken."""
    out: set[tuple[int, int]] = set()
    for f in findings:
        match = _STREAM_OF_MEMBER.search(f.member)
        if f.severity >= Severity.HIGH and match and f.offset is not None:
            out.add((int(match.group(1)), f.offset))
    return out


def build_report(
    ledger: Ledger,
    run_id: str,
    *,
    public_key: Any = None,
    checkpoint_dir: str | None = None,
    diff_pairs: list[tuple[str, str]] | None = None,
    diffs: bool = True,
) -> RunReport:
    """The report of ``run_id``; raises :class:`~trainguard.ledger.LedgerError` if it has
    no records.  ``public_key`` (object or PEM path) checks the signed heads."""
    from trainguard.explain.report.diffs import checkpoint_diffs
    from trainguard.ledger.verify import verify_run

    result = verify_run(ledger, run_id, public_key)
    collector = _Collector(_flagged_records(result.findings))
    for record in ledger.records(run_id):
        collector.feed(record)
    verification = Verification(
        records=result.records,
        streams=result.streams,
        signatures_checked=public_key is not None or bool(result.run_keys),
        signed_heads=result.signed_heads,
        heads_present=collector.heads,
        key_ids=collector.key_ids,
        findings=result.findings,
        key_source="given" if public_key is not None else ("run" if result.run_keys else "none"),
    )
    report = RunReport(
        run_id=run_id,
        ledger=str(getattr(ledger, "location", "ledger")),
        generated=time.time(),
        info=collector.info,
        timelines=sorted(collector.timelines.values(), key=lambda t: t.rank),
        ranks_not_plotted=sorted(collector.unplotted),
        alerts=sorted(collector.alerts, key=lambda a: (a.step is None, a.step or 0, a.rank)),
        alerts_total=collector.alerts_total,
        alert_rules=dict(collector.alert_rules.most_common()),
        markers=collector.markers,
        verification=verification,
        environment=collector.environment_status(),
        checkpoints=len(collector.checkpoints),
    )
    if collector.alerts_total > len(collector.alerts):
        report.notes.append(
            f"{collector.alerts_total - len(collector.alerts)} more alerts are not listed "
            f"(at most {MAX_ALERTS_LISTED})"
        )
    if collector.markers_dropped:
        report.notes.append(f"{collector.markers_dropped} alert or break marks are not drawn")
    if report.ranks_not_plotted:
        report.notes.append(
            f"{len(report.ranks_not_plotted)} ranks are not plotted (at most {MAX_RANKS_PLOTTED})"
        )
    skipped = sum(t.skipped_values for t in report.timelines)
    if skipped:
        report.notes.append(f"{skipped} step values were not numbers and are not plotted")
    if diffs:
        alert_steps: list[tuple[int, str]] = []
        for a in report.alerts:
            if a.step is not None and a.rule != "TG1312":
                alert_steps.append((a.step, f"{a.rule} at step {a.step}"))
        found, notes = checkpoint_diffs(
            collector.checkpoints,
            alert_steps,
            checkpoint_dir=checkpoint_dir,
            explicit=diff_pairs,
        )
        report.diffs, report.notes = found, report.notes + notes
    return report
