"""``trainguard replay``: re-run a watched run's steps and compare them with its ledger.

Each segment starts from a checkpoint (:mod:`trainguard.monitor.checkpoint`),
loaded through :func:`trainguard.load` after its BLAKE3 digest is checked
against the ledger.  The user's entry point builds the model, optimizer,
scheduler, batches and step function (:mod:`~trainguard.explain.replay.entry`);
replay loads the saved states into them, checks the restored state against
the ledger, restores every random state and runs the steps under a guard of
its own, so that every fingerprint is computed exactly as in training.  Each
step's record is compared with the ledger's, and the first one that differs
ends the segment.

With several checkpoints in range the run is replayed segment by segment,
each from its own checkpoint, in order, stopping at the first bad segment
(``all_segments`` goes on).  Segments are independent: one tampered step
makes its own segment diverge and leaves later segments replaying clean from
their checkpoints (which already hold its effect), so a binary search over
segments would not be sound, and none is done.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from trainguard.data.sealed import SampleError
from trainguard.errors import TrainguardError, UsageError
from trainguard.explain.replay import compare as cmp
from trainguard.explain.replay import datawitness, held, samples
from trainguard.explain.replay.entry import (
    Entry,
    Replayable,
    ReplayContext,
    as_replayable,
    epochs_from,
    load_entry,
)
from trainguard.explain.replay.ledger import (
    CheckpointRecord,
    ReplayError,
    RunHistory,
    locate,
    read_history,
    resolve_position,
    settled,
)
from trainguard.explain.replay.plan import plan_segments
from trainguard.explain.replay.ranks import Ranks
from trainguard.explain.replay.result import (
    DIVERGED,
    FIELD_ORDER,
    MATCHED,
    NOT_COMPARABLE,
    Divergence,
    FieldDiff,
    ReplayReport,
    Segment,
)
from trainguard.explain.replay.trust import LedgerCheck, check_ledger
from trainguard.ledger.chain import normalise_payload
from trainguard.monitor import checkpoint as ckpt
from trainguard.monitor import conditions

__all__ = [
    "ReplayContext",
    "ReplayError",
    "ReplayReport",
    "Replayable",
    "epochs_from",
    "load_entry",
    "replay",
]

Progress = Callable[[str], None]


def replay(
    ledger: Any,
    run_id: str,
    entry: Entry | str,
    *,
    start: int | str | None = None,
    stop: int | str | None = None,
    key: bytes | None = None,
    rank: int = 0,
    segmented: bool | None = None,
    all_segments: bool = False,
    checkpoint_dir: str | None = None,
    progress: Progress | None = None,
    verified_history: RunHistory | None = None,
    expect_data: str | None = None,
    public_key: Any = None,
    expect_key_ids: list[str] | None = None,
    live: bool = False,
) -> ReplayReport:
    """Replay positions ``start`` to ``stop`` of ``run_id`` (see the module and docs/replay.md).

    ``ledger`` is an open ledger or its URL; ``entry`` the entry function or
    its ``module:function``; ``start``/``stop`` positions (steps done) or
    checkpoint files; ``key`` the run's fingerprint key (without it the plain
    fingerprints are compared); ``segmented`` None: by checkpoint when the
    range holds several.  ``verified_history``: the rank's history as the caller read it
    and checked its chain (the verifier follows the run incrementally): the ledger is then
    neither re-read nor re-verified here, so a recomputation costs the same late in a long
    run as early.  ``expect_data``: the sealed dataset's digest the run must have read
    (``trainguard data seal`` prints it): a step recorded reading other data, or an entry
    reading other data, is a divergence (TG1522), whoever signed that data.
    ``public_key``, ``expect_key_ids``, ``live``: how the ledger is verified first, as by
    ``trainguard ledger verify`` (explain/replay/trust.py); a ledger that does not verify is
    not replayed and the verdict says so.
    """
    if verified_history is not None:
        history, location = verified_history, str(getattr(ledger, "location", ledger))
        check = LedgerCheck(description="verified by the caller as it read the run")
        check.signed_through = verified_history.signed_through
    else:
        history, location, check = _read_verified(
            ledger, run_id, rank, public_key, expect_key_ids, live
        )
    if check.problems:
        report = ReplayReport(location, run_id, rank, "none", 0, 0, False)
        _ledger_check(report, check)
        return report
    mode = _mode(history, key)
    func = load_entry(entry) if isinstance(entry, str) else entry
    begin = resolve_position(start, history, 0)
    # The run's extent: its last step record, or a later checkpoint (recorded after the
    # step before it: steps missing below one were withheld, and are replayed as missing).
    last = max([history.end, *(c.step for c in history.checkpoints)])
    end = min(resolve_position(stop, history, last), last)
    if begin >= end:
        raise UsageError(f"nothing to replay: the range {begin}..{end} holds no recorded step")
    report = ReplayReport(location, run_id, rank, mode, begin, end, False)
    _ledger_check(report, check)
    report.segments = plan_segments(history, begin, end, segmented, checkpoint_dir, report.notes)
    report.segmented = sum(1 for seg in report.segments if seg.end > seg.start) > 1
    report.data = samples.recorded_data(history.steps, begin, end)
    runner = _Runner(history, func, key, mode, checkpoint_dir, progress)
    runner.expect_data = expect_data
    runner.ranks.agree([(seg.start, seg.end) for seg in report.segments])
    for i, seg in enumerate(report.segments):
        runner.run(seg)
        if runner.ranks.any(seg.status != MATCHED) and not all_segments:
            for rest in report.segments[i + 1 :]:
                rest.notes.append("not replayed: an earlier segment diverged (use --all)")
            break
    return report


def _read_verified(
    ledger: Any,
    run_id: str,
    rank: int,
    public_key: Any,
    expect_key_ids: list[str] | None,
    live: bool,
) -> tuple[RunHistory, str, LedgerCheck]:
    """The rank's history and the verification of the run's ledger (trust.py)."""
    from trainguard.ledger import open_ledger

    own = isinstance(ledger, str)
    store = open_ledger(ledger, create=False) if own else ledger
    try:
        location = str(getattr(store, "location", ledger))
        try:
            history: RunHistory | None = read_history(store, run_id, rank)
        except ReplayError:
            history = None  # a stream that cannot be read: the check below says why
        seqs = history.seqs if history is not None else None
        check = check_ledger(
            store, run_id, rank, seqs,
            public_key=public_key, expect_key_ids=expect_key_ids, live=live,
        )  # fmt: skip
        if history is None:
            if check.problems:
                return RunHistory(run_id, rank, {}), location, check
            read_history(store, run_id, rank)  # raises the reading's own error
        assert history is not None
        return history, location, check
    finally:
        if own:
            store.close()


def _ledger_check(report: ReplayReport, check: LedgerCheck) -> None:
    report.ledger_problems = list(check.problems)
    report.ledger_check = check.description
    report.signed_through = check.signed_through
    report.notes.extend(check.notes)


def _mode(history: RunHistory, key: bytes | None) -> str:
    from trainguard.monitor.fingerprint import FINGERPRINT_VERSION

    version = history.start.get("fingerprint_version", 1)
    if version != FINGERPRINT_VERSION:
        # Recomputed digests of other math would all differ: no divergence to report.
        raise ReplayError(
            f"run {history.run_id!r} was recorded with fingerprint v{version}; this "
            f"trainguard computes v{FINGERPRINT_VERSION}: replay it with the trainguard "
            "version that recorded it"
        )
    if key is not None:
        from trainguard.monitor.fingerprint import Fingerprinter

        if Fingerprinter(key).digest_bytes(b"key-id") != history.start.get("key_id"):
            raise UsageError(
                f"the key does not belong to run {history.run_id!r} (its key id differs)"
            )
        return "keyed"
    if not any(isinstance(r.get("plain"), dict) for r in history.steps.values()):
        raise ReplayError(
            f"run {history.run_id!r} recorded no plain fingerprints (an older trainguard): "
            "pass the run's key (--key-file)"
        )
    return "plain"


class _Capture:
    """A ledger that keeps the replay guard's records in memory, as a ledger would store them."""

    def __init__(self) -> None:
        self.start: dict[str, Any] = {}
        self.steps: dict[int, dict[str, Any]] = {}
        self.outside: dict[int, list[dict[str, Any]]] = {}  # ctx.outside_step windows

    def append(
        self, run_id: str, kind: str, payload: dict[str, Any], *, step: Any = None, stream: int = -1
    ) -> None:
        normal, _ = normalise_payload(payload)
        if kind == "run-start":
            self.start = normal
        elif kind == "step" and isinstance(step, int):
            self.steps[step] = normal
        elif kind == "outside-step" and isinstance(step, int):
            self.outside.setdefault(step, []).append(normal)

    def optimizer_names(self, step: int) -> list[str]:
        names = list(self.start.get("optimizer_names") or [])
        for s in sorted(self.steps):
            listed = self.steps[s].get("optimizer_names")
            if s <= step and isinstance(listed, list):
                names = listed
        return names


class _Runner:
    def __init__(
        self,
        history: RunHistory,
        entry: Entry,
        key: bytes | None,
        mode: str,
        search_dir: str | None,
        progress: Progress | None,
    ) -> None:
        self.history = history
        self.entry = entry
        self.key = key
        self.mode = mode
        self.search_dir = search_dir
        self.progress = progress or (lambda text: None)
        self.records: dict[int, list[CheckpointRecord]] = {}
        for c in history.checkpoints:
            self.records.setdefault(c.step, []).append(c)
        self.ranks = Ranks()
        self.skipped = False  # this segment was not replayed because another rank's was bad
        # Position -> the carried state (monitor/carried.py) a replayed segment ended in.
        self.held = held.Held(history)
        self.expect_data: str | None = None  # the pinned dataset digest, if any

    def run(self, seg: Segment) -> None:
        t0 = time.perf_counter()
        self.skipped = False
        record = self._record(seg) if seg.checkpoint is not None else None
        try:
            self._run(seg, record)
        finally:
            seg.seconds = time.perf_counter() - t0
            seg.recorded_seconds = self.history.recorded_seconds(seg.start, seg.start + seg.steps)
        if self.skipped:
            seg.status = "skipped"
        elif seg.divergence is None:
            seg.status = MATCHED
        elif self.held.drawn_only(seg.divergence):
            seg.status = NOT_COMPARABLE  # not recomputable, by no one's word: says why
            seg.divergence = self.held.explained(seg.divergence)
        elif seg.divergence.kind == "step" and seg.conditions:
            seg.status = NOT_COMPARABLE
        else:
            seg.status = DIVERGED

    def _record(self, seg: Segment) -> CheckpointRecord | None:
        """The checkpoint record the segment starts from: the one named by its digest, else
        the last saved at its position."""
        at = self.records.get(seg.start, [])
        return next((c for c in at if c.blake3 == seg.blake3), at[-1] if at else None)

    def _run(self, seg: Segment, record: CheckpointRecord | None) -> None:
        h = self.history
        saved = None
        recorded_conditions = h.start.get("conditions") or {}
        if record is not None:
            saved, seg.divergence = self._open(seg, record)
            if saved is not None:
                recorded_conditions = record.payload.get("conditions") or saved.conditions
        else:
            self.progress(f"steps {seg.start}..{seg.end - 1} from the entry's initial state")
        if self.ranks.any(seg.divergence is not None):  # every rank replays, or none
            if seg.divergence is None:
                seg.notes.append("not replayed: another rank's checkpoint diverged")
                self.skipped = True
            return
        seg.held, restore = conditions.hold(recorded_conditions)
        quiet = logging.getLogger("trainguard.monitor")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # the replay guard's own alerts are not the point
        try:
            self._replay(seg, saved, recorded_conditions)
        finally:
            quiet.setLevel(level)
            restore()

    def _open(
        self, seg: Segment, record: CheckpointRecord
    ) -> tuple[ckpt.Checkpoint | None, Divergence | None]:
        """The checkpoint at the segment's start, read through trainguard.load and checked."""
        h = self.history
        path = locate(record, self.search_dir)
        assert path is not None  # plan_segments kept only checkpoints it found
        self.progress(f"steps {seg.start}..{seg.end - 1} from {path}")
        digest, _ = ckpt.file_digest(path)
        if digest != record.blake3:
            diff = FieldDiff("file", record.blake3, digest)
            return None, _checkpoint_divergence(seg.start, [diff], h)
        saved = ckpt.read(path)
        if (saved.run_id, saved.step) != (h.run_id, seg.start):
            diff = FieldDiff(
                "run", f"{h.run_id} step {seg.start}", f"{saved.run_id} step {saved.step}"
            )
            return saved, _checkpoint_divergence(seg.start, [diff], h)
        carried_diff = self.held.carried(seg.start, record, saved, seg.notes)
        if carried_diff is not None:
            return saved, _checkpoint_divergence(seg.start, [carried_diff], h)
        return saved, None

    def _replay(
        self, seg: Segment, saved: ckpt.Checkpoint | None, recorded_conditions: dict[str, Any]
    ) -> None:
        from trainguard.monitor.guard import Guard

        h = self.history
        data = saved.data if saved is not None else {}
        ctx = ReplayContext(
            run_id=h.run_id,
            rank=h.rank,
            start=seg.start,
            stop=seg.end,
            checkpoint=saved.path if saved else None,
            data_state=data.get("state"),
            loader_state=data.get("loader"),
        )
        first = saved is not None and seg.start == 0
        scrambled = held.scramble() if first else None
        run = _call("the entry point", lambda: as_replayable(self.entry(ctx)))
        bound = self.held.bindings[seg.start] = datawitness.bind(run, ctx.data_state)
        if saved is not None:
            if seg.start == 0:
                # The honest entry's fresh objects are the state before step 0.
                fresh = _call("reading the entry's state", lambda: held.fresh_state(run, scrambled))
                fresh.update(datawitness.fresh(self.entry, ctx, run, bound, seg.notes))
                carried_diff = held.difference(fresh, self.held.restored(saved, whole=True))
            else:  # where the segment before was not replayed: the schedule recomputed
                carried_diff = _call(
                    "recomputing the schedule",
                    lambda: self.held.schedule(run, saved, seg.start, seg.notes),
                )
            if carried_diff is not None:
                seg.divergence = _checkpoint_divergence(seg.start, [carried_diff], h)
            _call(
                "restoring the checkpoint into the entry's objects",
                lambda: held.restore(run, saved),
            )
            moved = self.held.since_last_step(
                seg.start, saved, run.draws_before_saves, seg.notes
            )  # the segment before not replayed: its last step's record is the witness
            if moved is not None and seg.divergence is None:
                seg.divergence = _checkpoint_divergence(seg.start, [moved], h)
        seg.conditions = conditions.differences(recorded_conditions, conditions.gather(run.model))
        capture = _Capture()
        guard = Guard(
            run.model,
            run.optimizer,
            scheduler=run.scheduler,
            dataloader=run.dataloader,  # its generators are among the recorded random states
            ledger=capture,
            run_id=f"replay:{h.run_id}",
            every=h.every,
            key=self.key,
            rank=h.rank,
            world_size=1,
            on_alert=lambda alert: None,
            min_stall_seconds=math.inf,
            sign_key=False,  # records go to memory only: nothing to sign
        )
        ctx.guard_slot.append(guard)  # ctx.outside_step() declares through it
        try:
            if saved is not None:
                ckpt.restore_random_states(saved.rng)
            guard.step_index = seg.start
            label = _labeler(run)
            params = (h.param_names, list(capture.start.get("param_names") or []))
            opt_names = (h.optimizer_names_at(seg.start - 1), capture.optimizer_names(-1))
            restored = capture.start.get("state") or {}
            expected = self.held.state(seg.start)
            diffs = cmp.compare_state(expected, restored, self.mode, params, opt_names, label)
            if diffs and seg.divergence is None:
                seg.divergence = _checkpoint_divergence(seg.start, diffs, h)
            if self.ranks.any(seg.divergence is not None):
                if seg.divergence is None:
                    seg.notes.append("not replayed: another rank's checkpoint diverged")
                    self.skipped = True
                return
            self._steps(seg, run, guard, capture, params, label)
        finally:
            ctx.guard_slot.clear()
            guard.close()

    def _steps(
        self,
        seg: Segment,
        run: Replayable,
        guard: Any,
        capture: _Capture,
        params: tuple[list[str], list[str]],
        label: cmp.Label,
    ) -> None:
        h = self.history
        batches = _call("iterating batches", lambda: iter(run.batches))
        record_batch = run.record_batch or (lambda b: b)
        for s in range(seg.start, seg.end):
            rec = h.steps.get(s)
            if rec is None:
                # Fail closed: a step the range holds but the ledger does not record (a record
                # withheld: what it would show cannot be compared) is never "matched".
                seg.divergence = Divergence(
                    s,
                    "step",
                    (FieldDiff("record", "none", f"step {s} in range {seg.start}..{seg.end - 1}"),),
                    f"the ledger has no record of step {s} although the run went on past it: "
                    "the record was withheld or deleted, so the step cannot be compared",
                    tuple(h.alerts.get(s, ())),
                )
                return
            try:
                batch = _call(f"the batches (step {s})", lambda: next(batches, _END))
            except SampleError as exc:  # the sealed data at rest differs from its seal
                seg.divergence = samples.read_divergence(s, exc, tuple(h.alerts.get(s, ())))
                return
            if batch is _END:
                raise ReplayError(f"the entry's batches ran out at step {s}")
            resumed = s == seg.start and self._resumed(seg, guard, record_batch(batch))
            if resumed and not self.ranks.distributed:
                return  # (ranks step on together, as below)
            loss = _call(f"the step function (step {s})", functools.partial(run.step, batch))
            guard.step(loss=loss, batch=record_batch(batch))
            rep = capture.steps[s]
            seg.steps += 1
            before = (
                _before(rec, h.steps.get(s - 1), h.start),
                _before(rep, capture.steps.get(s - 1), capture.start),
            )
            optimizer_names = (h.optimizer_names_at(s), capture.optimizer_names(s))
            checked = s % h.every == 0 and rec.get("before") is not None
            sides = cmp.Sides(
                self.mode,
                checked,
                params,
                optimizer_names,
                before,
                label,
                h.grad_norm_measured,
                h.start.get("budget") is not None,
            )
            diffs = cmp.compare_step(rec, rep, sides)
            diffs += cmp.compare_outside(
                h.outside.get(s, []), capture.outside.get(s, []), self.mode, sides.budget
            )
            if h.outside.get(s) and not capture.outside.get(s):
                seg.notes.append(_UNDECLARED.format(step=s, what=cmp.windows(h.outside[s])))
            diffs += samples.compare(
                rec, rep, self.mode, *samples.of_guard(guard), h.rank, expect=self.expect_data
            )
            if samples.unchecked(rec, rep) and samples.UNCHECKED not in seg.notes:
                seg.notes.append(samples.UNCHECKED)
            diffs.sort(key=lambda d: FIELD_ORDER.index(d.field))
            if diffs and seg.divergence is None:
                hooked = rec.get("hooks") is not False
                why = cmp.cause(diffs, s, "step", checked=checked, hooked=hooked)
                declared = [*h.outside.get(s - 1, []), *h.outside.get(s, [])]
                if declared and not any(d.field == "outside" for d in diffs):
                    why += (
                        f"; the run declared weights written outside the step there "
                        f"({cmp.windows(declared)}): redoing the step does not give them"
                    )
                seg.divergence = Divergence(
                    s, "step", tuple(diffs), why, tuple(h.alerts.get(s, ()))
                )
            if seg.divergence is not None and not self.ranks.distributed:
                return  # (ranks step on together: the others' collectives wait for this one)
        if seg.end == seg.start and seg.divergence is None and seg.end in self.held.next_batch:
            first = held.peek(batches)  # the checkpoint the range ends at: where it resumes
            if first is not None:
                self._resumed(seg, guard, record_batch(first))
        if seg.end == seg.start or seg.divergence is not None:
            return
        # Every step matched: what the checkpoint at seg.end restores must be this.
        bound = self.held.bindings.get(seg.start)
        state = _call("reading the replay's state", lambda: held.end_state(run, bound))
        last = settled(capture.steps[seg.end - 1], _late_windows(h, capture, guard, seg.end))
        self.held.remember(seg.end, state, last)
        # ... and the batch its data gives next: the position the checkpoint must resume at.
        after = held.peek(batches)
        if after is not None:
            self.held.next_batch[seg.end] = held.batch_print(guard, record_batch(after))

    def _resumed(self, seg: Segment, guard: Any, batch: Any) -> bool:
        """Whether the data position the segment's checkpoint restores differs from the
        one replaying up to it reached (held.Held.data_position); sets the divergence."""
        rec = self.history.steps.get(seg.start) or {}
        diff = self.held.data_position(seg.start, held.batch_print(guard, batch), rec, self.mode)
        if diff is None:
            return False
        seg.divergence = _checkpoint_divergence(seg.start, [diff], self.history)
        return True


_END = object()


# A window the run declared (guard.outside_step) that the entry did not (ctx.outside_step):
# the weights it wrote are still held to the step's records, so this is no pass.
_UNDECLARED = (
    "step {step}: the run declared weights written outside the optimizer step ({what}); the "
    "entry's step did not declare that window (ctx.outside_step), so its record was not "
    "compared: only the step's own records checked what it wrote"
)


def _late_windows(h: RunHistory, capture: _Capture, guard: Any, end: int) -> list[dict[str, Any]]:
    """Where the run declared a window after the last step's update (Lookahead), the weights
    the replay ended in, fingerprinted now by its guard: what the checkpoint at ``end``
    must hold, whether or not the entry declared the window itself."""
    windows = [*h.outside.get(end - 1, []), *capture.outside.get(end - 1, [])]
    if not any(w.get("after_update") for w in windows):
        return []
    now = guard.tamper.fp.fingerprint(guard.tamper.params)
    return [{"after_update": True, "after": now.digest, "plain": {"after": now.plain},
             "tensors_after": now.compact()}]  # fmt: skip


def _call(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except TrainguardError:
        raise
    except Exception as exc:
        raise ReplayError(f"{what} raised {type(exc).__name__}: {exc}") from exc


def _before(rec: dict[str, Any], prev: dict[str, Any] | None, start: dict[str, Any]) -> Any:
    """Per-tensor digests before the step: recorded only when they differ from the last "after"."""
    tensors = rec.get("tensors") or {}
    if "before" in tensors:
        return tensors["before"]
    if prev is not None:
        return (prev.get("tensors") or {}).get("after")
    return ((start.get("state") or {}).get("tensors") or {}).get("params")


def _labeler(run: Replayable) -> cmp.Label:
    """Optimizer tensor "3.exp_avg" -> "exp_avg of 1.bias" (the parameter's name)."""
    names = {id(p): n for n, p in run.model.named_parameters()}
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    by_index = {str(i): names.get(id(p)) for i, p in enumerate(params)}

    def label(name: str) -> str:
        index, dot, slot = name.partition(".")
        param = by_index.get(index)
        return f"{slot} of {param}" if dot and param and index.isdigit() else name

    return label


def _checkpoint_divergence(step: int, diffs: list[FieldDiff], h: RunHistory) -> Divergence:
    return Divergence(step, "checkpoint", tuple(diffs), cmp.cause(diffs, step, "checkpoint"))
