"""The verifier: follow a run, recompute the segments its secret picks, sign its verdicts.

One long-lived process (start-up paid once: torch, the entry's module) polls
the run's ledger.  A segment ``[a, b)`` is complete when every rank has
recorded its checkpoint at ``b``; the verifier draws it (:mod:`.sampling`)
and, when picked, replays it from the checkpoint at ``a`` through the honest
entry point and checks the checkpoint at ``b`` against what the replay ended
in (weights, optimizer, scheduler, random and data states: a checkpoint
carrying sabotage is named).  A data-parallel run is replayed with all its
ranks (:func:`~trainguard.explain.replay.ranks.replay_ranks`).

Segment bounds and the run's end come from the step records each rank wrote
(:mod:`.coverage`): every recorded step ends up recomputed, skipped by the draw,
or uncovered, and uncovered steps at the end are named (TG1514).

Verdicts go to a chain of their own, run id ``RUN/verify``, in the same ledger,
each followed by a head signed with the verifier's key, over its own records
only (:mod:`.chain`): the training process can write to the ledger, but cannot
forge, drop or slip in a signed verdict.  A
divergence is also an ``alert`` record there, like watch's (rule, message,
step, rank, tensors, cause).  Checkpoint files next to the recorded ones that
no ledger record names are alerts too.  On a PostgreSQL ledger the steps'
claimed durations are held to the server's clock (:mod:`.clock`, TG1513).

Each poll reads only the records written since the last one (per stream,
after the last sequence number read), so following a long run costs the same
per poll as a short one.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trainguard.errors import TrainguardError, UsageError
from trainguard.explain.replay.entry import Entry, load_entry
from trainguard.explain.replay.ranks import sources
from trainguard.explain.replay.result import (
    DIVERGED,
    MATCHED,
    NOT_COMPARABLE,
    ReplayReport,
    step_rule,
)
from trainguard.explain.verifier.chain import VerifierChain, streams_of
from trainguard.explain.verifier.clock import RULE as CLOCK_RULE
from trainguard.explain.verifier.clock import ServerClock
from trainguard.explain.verifier.coverage import FAILED, RECOMPUTED, SKIPPED, Coverage, stretches
from trainguard.explain.verifier.coverage import RULE as COVERAGE_RULE
from trainguard.explain.verifier.files import Folders
from trainguard.explain.verifier.pool import RankPool
from trainguard.explain.verifier.reading import RunReader
from trainguard.explain.verifier.sampling import DEFAULT_RATE, chosen, detection_probability

VERIFY_SUFFIX = "/verify"
POLL_SECONDS = 0.5
# After the run ended, polls go on this many times (the grace): records after a run-end
# are named, not left to a verifier that already stopped reading.
GRACE_POLLS = 10
ERROR = "error"


class VerifierError(TrainguardError):
    """The verifier could not start or go on (the CLI exits 2)."""


@dataclass(frozen=True)
class Verdict:
    """What recomputing one segment found."""

    start: int
    end: int
    status: str  # matched, diverged, not-comparable, error
    step: int | None = None  # the first step (or checkpoint position) that diverged
    ranks: tuple[int, ...] = ()  # where it began
    cause: str = ""
    fields: tuple[str, ...] = ()
    tensors: tuple[str, ...] = ()
    seconds: float = 0.0
    data: tuple[str, ...] = ()  # the sealed datasets (digests) the run recorded reading
    # The last step of the segment's ranks that a verified signed head covered when it was
    # recomputed (the lowest over the ranks; None: none yet, or an unsigned run).
    signed_through: int | None = None


@dataclass
class Summary:
    run_id: str
    rate: float
    fraction: float  # the assumed share of segments a sabotage is active in
    segments_seen: int = 0
    verdicts: list[Verdict] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)  # as written to the ledger
    finished: bool = False  # the run ended (every rank wrote run-end) and all was checked
    problems: list[str] = field(default_factory=list)  # what kept segments from being checked
    notes: list[str] = field(default_factory=list)  # what a check left out (never silent)
    # Segments per outcome (recomputed, skipped by the draw, failed) and, per rank, the
    # stretches of recorded steps no segment covered (text), as of the last pass.
    coverage: dict[str, Any] = field(default_factory=dict)

    @property
    def detection(self) -> float:
        return detection_probability(self.rate, self.fraction, self.segments_seen)

    def exit_code(self) -> int:
        statuses = {v.status for v in self.verdicts}
        if DIVERGED in statuses or self.alerts:
            return 1
        return 2 if statuses - {MATCHED} or self.problems else 0


class Verifier:
    """Follows ``run_id`` in ``ledger`` (a URL); see the module."""

    def __init__(
        self,
        ledger: str,
        run_id: str,
        entry: Entry | str,
        *,
        signing_key: Any,
        secret: bytes,
        rate: float = DEFAULT_RATE,
        fraction: float = 0.1,
        run_key: bytes | None = None,
        checkpoint_dir: str | None = None,
        expect_data: str | None = None,
        ledger_key: Any = None,
        expect_key_ids: list[str] | None = None,
    ) -> None:
        from trainguard.ledger import open_ledger
        from trainguard.signing.keys import private_key_from

        if not 0.0 < rate <= 1.0 or not 0.0 < fraction <= 1.0:
            raise UsageError("the sampling rate and the assumed fraction are in (0, 1]")
        self.url = ledger
        self.run_id = run_id
        self.spec = entry if isinstance(entry, str) else None
        self.entry = load_entry(entry) if isinstance(entry, str) else entry  # imported once
        self.signing_key = private_key_from(signing_key)
        self.secret = secret
        self.run_key = run_key
        self.checkpoint_dir = checkpoint_dir
        self.expect_data = expect_data  # the dataset digest the run must read (TG1522)
        self.store = open_ledger(ledger, create=False)
        self.chain = run_id + VERIFY_SUFFIX
        self.summary = Summary(run_id, rate, fraction)
        self.coverage = Coverage()  # what became of every recorded step
        self.folders = Folders(run_id, checkpoint_dir, self._alert)
        # Only the verifier writes its chain (a foreign record is named, never signed over).
        self.out = VerifierChain(self.store, self.chain, self.signing_key)
        # What the ledger said so far, read incrementally (:mod:`.reading`).
        # Signed heads are checked as they are read (:mod:`.heads`), with ``ledger_key`` or
        # the run keys (held to ``expect_key_ids``), as `trainguard ledger verify` does.
        self.ledger_key = ledger_key
        self.expect_key_ids = expect_key_ids
        self.reader = RunReader(
            self.store, run_id, public_key=ledger_key, expect_key_ids=expect_key_ids
        )
        self._broken_alerted = False
        self._start: dict[str, Any] | None = None
        self._checkpoints: dict[int, dict[int, Any]] = {}
        # Every checkpoint record, also a second at one step (latest.pt beside step-N.pt):
        # a file any of them names is a recorded one.
        self._recorded_files: list[Any] = []
        self._ended: set[int] = set()
        self.clock = ServerClock()  # claimed step times against the server's (PostgreSQL)
        self._verified_at_end = False
        self._concluded = False
        self._pool: RankPool | None = None  # a data-parallel run's replay processes

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        self.store.close()

    # -- one pass ------------------------------------------------------------------
    def poll(
        self, on_verdict: Callable[[Verdict], None] | None = None, *, final: bool = False
    ) -> list[Verdict]:
        """Verify the picked segments completed since the last poll; check the folders.

        ``on_verdict`` is called with each verdict as soon as it is written (a poll may
        recompute several segments).  ``final``: the last pass (one-pass check, or the end of
        following): files are judged as they are seen."""
        start, checkpoints, ended = self._read()
        if self.reader.broken is not None and not self._broken_alerted:
            # Once, in the verifier's own chain: every later recomputation is refused.
            self._broken_alerted = True
            self._alert(
                self.reader.broken_rule,
                f"{self.reader.broken}: no segment is recomputed on this history",
                None,
                {"refused": "every segment from now on"},
            )
            self._sign()
        self._shape_alerts()
        if start is None:
            return []
        world = int(start.get("world_size") or 1)
        self.summary.finished = world > 0 and all(r in ended for r in range(world))
        new = []
        for a, b in self.coverage.ready(world, self.summary.finished):
            self.summary.segments_seen += 1
            if not chosen(self.secret, self.run_id, a, self.summary.rate):
                self.coverage.mark(a, b, SKIPPED)
                continue
            verdict = self._verify(a, b, world)
            self.coverage.mark(a, b, FAILED if verdict.status == ERROR else RECOMPUTED)
            self._write(verdict)
            new.append(verdict)
            if on_verdict is not None:
                on_verdict(verdict)
        self.folders.scan(self._recorded_files, final=final)
        for severity, message, step, evidence in self.clock.judge(final=self.summary.finished):
            self._alert(CLOCK_RULE, message, step, evidence, severity)
        self._shape_alerts()
        self.summary.notes = self.clock.notes() + [
            f"rank {rank}'s step {step} was interrupted after its record (its run-end counts "
            f"{step} steps, ledger/endcount.py) and its peers never finished it: not "
            "recomputed, and no checkpoint restores its result"
            for rank, step in self.coverage.cut_short(world).items()
        ]
        common = set.intersection(*(set(checkpoints.get(r, {})) for r in range(world)))
        lone = sorted(set().union(*(set(c) for c in checkpoints.values())) - common)
        if self.summary.finished and lone and not self.summary.problems:
            # Fail closed: a segment no rank group can replay is not silently skipped.
            self.summary.problems.append(
                f"checkpoints at steps {', '.join(map(str, lone[:10]))} were not saved by every "
                f"one of the {world} ranks, so the segments they bound cannot be recomputed "
                "(call guard.checkpoint on every rank, docs/replay.md)"
            )
        if self.summary.finished and not self._verified_at_end:
            self._verify_whole_run()
        self._account(world)
        return new

    def conclude(self) -> Summary:
        """The last word (end of following, or after a one-pass check): a world size the
        streams do not show, and recorded steps no segment covered, are named."""
        start = self._start
        if start is None or self._concluded:
            return self.summary
        self._concluded = True
        world = int(start.get("world_size") or 1)
        streams = streams_of(self.store, self.run_id)
        missing = [r for r in range(world) if r not in streams]
        if missing and self.coverage.last:
            self._alert(
                COVERAGE_RULE,
                f"the run-start says world size {world}, but rank(s) "
                f"{', '.join(map(str, missing[:10]))} wrote nothing while rank(s) "
                f"{', '.join(map(str, sorted(self.coverage.last)[:10]))} recorded steps",
                None,
                {"world_size": world, "streams": streams[:100], "missing": missing[:100]},
            )
        gaps = self.coverage.uncovered(world)
        if gaps:
            named = "; ".join(f"rank {r}: steps {stretches(g)}" for r, g in sorted(gaps.items()))
            if self.summary.finished or missing:
                self._alert(
                    COVERAGE_RULE,
                    f"recorded steps no segment covered (neither recomputed nor drawn): {named}",
                    min(g[0][0] for g in gaps.values()),
                    {"uncovered": {str(r): g[:100] for r, g in gaps.items()}},
                )
            else:
                self.summary.problems.append(
                    f"recorded steps not covered yet (the run has not ended; the steps after "
                    f"the last checkpoint are a segment once it ends): {named}"
                )
        self.out.prepare()  # records already in the chain are named even if nothing else is
        self._sign()
        self._account(world)
        return self.summary

    def _account(self, world: int) -> None:
        outcomes = list(self.coverage.judged.values())
        gaps = self.coverage.uncovered(world)
        self.summary.coverage = {
            "segments": {o: outcomes.count(o) for o in (RECOMPUTED, SKIPPED, FAILED)},
            "uncovered": {str(r): stretches(g) for r, g in sorted(gaps.items())},
        }

    def _shape_alerts(self) -> None:
        """What the coverage reading found wrong with the run's records (TG1514)."""
        found = self.coverage.take()
        for f in found:
            self._alert(COVERAGE_RULE, f.message, f.step, f.evidence)
        if found:
            self._sign()

    def follow(
        self,
        *,
        timeout: float | None = None,
        poll_seconds: float = POLL_SECONDS,
        on_verdict: Callable[[Verdict], None] | None = None,
        grace: float | None = None,
    ) -> Summary:
        """Poll until the run has ended and ``grace`` seconds more (default GRACE_POLLS
        polls: records after the end are named), or ``timeout``; then :meth:`conclude`."""
        grace = GRACE_POLLS * poll_seconds if grace is None else grace
        began = time.monotonic()
        ended_at: float | None = None
        while True:
            self.poll(on_verdict)
            now = time.monotonic()
            if ended_at is None and self._streams_ended():
                ended_at = now
            if ended_at is not None and now - ended_at >= grace:
                break
            if timeout is not None and now - began > timeout:
                break
            time.sleep(poll_seconds)
        self.poll(on_verdict, final=True)
        return self.conclude()

    def _streams_ended(self) -> bool:
        """Every rank ended; or every rank stream that exists ended (a world size claimed
        beyond them is named by :meth:`conclude`)."""
        if self.summary.finished:
            return True
        if self._start is None:
            return False
        streams = streams_of(self.store, self.run_id)
        return bool(streams) and all(s in self._ended for s in streams)

    # -- reading the run -------------------------------------------------------------
    def _read(self) -> tuple[dict[str, Any] | None, dict[int, dict[int, Any]], set[int]]:
        from trainguard.explain.replay.ledger import CheckpointRecord

        for r in self.reader.new_records():
            self.clock.feed(r)
            self.coverage.feed(r)
            p = r.payload
            if r.kind == "run-start" and r.stream == 0:
                self._start = p
            elif r.kind == "run-end" and r.stream >= 0:
                self._ended.add(r.stream)
            elif r.kind == "checkpoint" and isinstance(p.get("step"), int):
                rec = CheckpointRecord(
                    p["step"], str(p.get("path", "")), str(p.get("name", "")),
                    str(p.get("blake3", "")), p,
                )  # fmt: skip
                self._checkpoints.setdefault(r.stream, {})[rec.step] = rec
                self._recorded_files.append(rec)
        return self._start, self._checkpoints, self._ended

    def _verify_whole_run(self) -> None:
        """Once, when every rank has ended: what only the whole run shows (signed heads),
        as each recomputation used to check it (``live``: the final heads are signed just
        after the run-end records, and ``trainguard ledger verify`` checks those)."""
        from trainguard.findings import Severity
        from trainguard.ledger import verify_ledger

        self._verified_at_end = True
        findings = verify_ledger(
            self.store,
            self.run_id,
            self.ledger_key,
            live=True,
            expect_key_ids=self.expect_key_ids,
        )
        broken = [f for f in findings if f.severity >= Severity.HIGH]
        if broken:
            self.summary.problems.append(
                f"the ledger of run {self.run_id!r} does not verify ({broken[0].rule}: "
                f"{broken[0].message}); run `trainguard ledger verify`"
            )

    # -- recomputing a segment ---------------------------------------------------------
    def _verify(self, a: int, b: int, world: int) -> Verdict:
        from trainguard.explain.replay.engine import replay

        began = time.perf_counter()
        options: dict[str, Any] = {
            "start": a, "stop": b, "key": self.run_key, "segmented": True,
            "checkpoint_dir": self.checkpoint_dir, "expect_data": self.expect_data,
        }  # fmt: skip
        try:
            if self.reader.broken is not None:
                raise VerifierError(self.reader.broken)
            if world > 1:
                if self.spec is None:
                    raise VerifierError("a data-parallel run needs the entry as module:function")
                if self._pool is None:  # started once; lives until close() or a failure
                    self._pool = RankPool(self.url, self.run_id, self.spec, world, self.run_key)
                try:  # the key went to the pool once, on its processes' stdin
                    reports = self._pool.replay({k: v for k, v in options.items() if k != "key"})
                except TrainguardError:
                    self._pool = None  # it closed itself: the next segment starts afresh
                    raise
            else:
                history = self.reader.history(0)
                reports = [
                    replay(self.store, self.run_id, self.entry, verified_history=history, **options)
                ]
        except TrainguardError as exc:
            return Verdict(a, b, ERROR, cause=str(exc), seconds=time.perf_counter() - began)
        verdict = _verdict(a, b, reports, time.perf_counter() - began)
        signed = [self.reader.history(r).signed_through for r in range(world)]
        through = None if None in signed else min(s for s in signed if s is not None)
        return dataclasses.replace(verdict, signed_through=through)

    def _write(self, verdict: Verdict) -> None:
        """The verdict, an alert if it diverged, and a head signed with the verifier's key."""
        self.summary.verdicts.append(verdict)
        payload = {
            "run_id": self.run_id,
            "start": verdict.start,
            "end": verdict.end,
            "status": verdict.status,
            "step": verdict.step,
            "ranks": list(verdict.ranks),
            "cause": verdict.cause,
            "fields": list(verdict.fields),
            "data": list(verdict.data),
            "signed_through": verdict.signed_through,
            "seconds": round(verdict.seconds, 6),
            "rate": self.summary.rate,
            "segments_seen": self.summary.segments_seen,
            "segments_checked": len(self.summary.verdicts),
            "detection_probability": {
                "fraction": self.summary.fraction,
                "value": round(self.summary.detection, 6),
            },
        }
        self.out.append("verdict", payload, verdict.start)
        # Not comparable is a divergence too: the conditions that would excuse it are the
        # training process's own report, so it never goes without an alert.
        if verdict.status in (DIVERGED, NOT_COMPARABLE) and verdict.step is not None:
            # A step's sealed-data difference goes under its own rule (TG152x).
            rule = "TG1511" if "checkpoint" in verdict.fields else step_rule(verdict.fields)
            where = "the checkpoint at" if rule == "TG1511" else "step"
            ranks = ", ".join(map(str, verdict.ranks)) or "?"
            what = (
                "does not recompute"
                if verdict.status == DIVERGED
                else "could not be recomputed as recorded, so the run is unverified there "
                "(an entry that does not redo what training did looks the same: fix the "
                "entry as the cause says, or treat it as tampering that hides from "
                "recomputation)"
            )
            self._alert(
                rule,
                f"{where} {verdict.step} {what} (rank {ranks}): {verdict.cause}",
                verdict.step,
                {"ranks": list(verdict.ranks), "tensors": list(verdict.tensors),
                 "fields": list(verdict.fields), "segment": [verdict.start, verdict.end]},
            )  # fmt: skip
        self._sign()

    def _alert(
        self,
        rule: str,
        message: str,
        step: int | None,
        evidence: dict[str, Any],
        severity: str = "high",
    ) -> None:
        payload = {"rule": rule, "severity": severity, "message": message, "evidence": evidence}
        self.summary.alerts.append(payload)
        self.out.append("alert", payload, step)
        self._foreign()

    def _foreign(self) -> None:
        """Name the records of the verifier's chain it did not write (in its fresh stream)."""
        for f in self.out.take():
            payload = {
                "rule": "TG1515",
                "severity": "high",
                "message": f"{self.chain} stream {f.stream} seq {f.first_seq}..{f.last_seq}: "
                "records the verifier did not write (never covered by its signature)",
                "evidence": {"stream": f.stream, "from_seq": f.first_seq, "to_seq": f.last_seq},
            }
            self.summary.alerts.append(payload)
            self.out.append("alert", payload, None)

    def _sign(self) -> None:
        self._foreign()
        self.out.sign()
        if self.out.found:  # the head found a foreign record: named, then signed afresh
            self._foreign()
            self.out.sign()


def _verdict(a: int, b: int, reports: list[ReplayReport], seconds: float) -> Verdict:
    worst = next(
        (s for s in (DIVERGED, NOT_COMPARABLE) if any(r.verdict == s for r in reports)), MATCHED
    )
    step, ranks = sources(reports)
    data = tuple(dict.fromkeys(d for r in reports for d in r.data))
    if worst == MATCHED or step is None:
        return Verdict(a, b, worst, seconds=seconds, data=data)
    report = next(r for r in reports if r.rank == ranks[0])
    d = report.first_divergence
    assert d is not None
    fields = tuple(f.field for f in d.fields) + (("checkpoint",) if d.kind == "checkpoint" else ())
    tensors = tuple(dict.fromkeys(t for f in d.fields for t in f.tensors))
    cause = d.cause
    held = "; ".join(dict.fromkeys(str(c) for r in reports for s in r.segments
                                   for c in s.conditions))  # fmt: skip
    if worst == NOT_COMPARABLE and held:  # else the cause says why on its own
        cause += (
            f" (under conditions the run reports otherwise: {held}; they may explain it, or "
            "the run reported them falsely: recompute on the recorded conditions)"
        )
    return Verdict(a, b, worst, step, tuple(ranks), cause, fields, tensors, seconds, data)
