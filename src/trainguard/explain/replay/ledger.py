"""A run as its ledger tells it: the start, every step's record, the checkpoints.

Positions count steps done: the checkpoint at position ``p`` holds the state
before step ``p``, which the ledger describes as step ``p - 1``'s "after" (or
the run-start record's state for ``p = 0``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from trainguard.errors import TrainguardError, UsageError


class ReplayError(TrainguardError):
    """Replay could not be done (the CLI exits 2)."""


@dataclass(frozen=True)
class CheckpointRecord:
    step: int
    path: str
    name: str
    blake3: str
    payload: dict[str, Any]


@dataclass
class RunHistory:
    run_id: str
    rank: int
    start: dict[str, Any]
    steps: dict[int, dict[str, Any]] = field(default_factory=dict)
    checkpoints: list[CheckpointRecord] = field(default_factory=list)
    alerts: dict[int, list[str]] = field(default_factory=dict)
    # (step, names): the optimizer's tensor names from that step's record on.
    optimizer_names: list[tuple[int, list[str]]] = field(default_factory=list)
    # step -> the seq of its record: which steps a signed head covers (LedgerCheck)
    seqs: dict[int, int] = field(default_factory=dict)
    # position (steps done when the block ran) -> its outside-step records (guard.outside_step)
    outside: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    # The last step a verified signed head covers, when the reader checked heads as it read
    # (the verifier, explain/verifier/reading.py); None: none does, or nobody checked.
    signed_through: int | None = None

    @property
    def grad_norm_measured(self) -> bool:
        """False when the run took gradient norms from the loop (``measure_grad_norm=False``)."""
        return self.start.get("measure_grad_norm", True) is not False

    @property
    def every(self) -> int:
        every = self.start.get("every", 1)
        return every if isinstance(every, int) and every > 0 else 1

    @property
    def param_names(self) -> list[str]:
        return list(self.start.get("param_names") or [])

    @property
    def end(self) -> int:
        """The position after the last recorded step."""
        return max(self.steps) + 1 if self.steps else 0

    def optimizer_names_at(self, step: int) -> list[str]:
        """The optimizer tensor names in effect for step ``step``'s record (-1: the start)."""
        names: list[str] = list(self.start.get("optimizer_names") or [])
        for since, listed in self.optimizer_names:
            if since <= step:
                names = listed
        return names

    def state_at(self, position: int) -> dict[str, Any]:
        """Digests of the parameters and optimizer state at ``position`` (see the module)."""
        if position == 0:
            state = self.start.get("state")
            return state if isinstance(state, dict) else {}
        rec = self.steps.get(position - 1)
        if rec is None:
            return {}
        rec = settled(rec, self.outside.get(position - 1, []))
        plain = rec.get("plain") or {}
        tensors = rec.get("tensors") or {}
        return {
            "params": rec.get("after"),
            "optimizer": rec.get("optimizer"),
            "plain": {"params": plain.get("after"), "optimizer": plain.get("optimizer")},
            "tensors": {"params": tensors.get("after"), "optimizer": tensors.get("optimizer")},
        }

    def recorded_seconds(self, start: int, end: int) -> float:
        total = 0.0
        for s in range(start, end):
            t = self.steps.get(s, {}).get("step_time")
            if isinstance(t, (int, float)):
                total += float(t)
        return total


def settled(record: dict[str, Any], windows: list[dict[str, Any]]) -> dict[str, Any]:
    """A step's record with the weights it left: those of the last window declared after
    its update (guard.outside_step after optimizer.step, as Lookahead does), whose record
    holds their digests; the step's own "after" otherwise."""
    late = [w for w in windows if w.get("after_update")]
    if not late:
        return record
    last = late[-1]
    plain = dict(record.get("plain") or {}, after=(last.get("plain") or {}).get("after"))
    tensors = dict(record.get("tensors") or {}, after=last.get("tensors_after"))
    return dict(record, after=last.get("after"), plain=plain, tensors=tensors)


def read_history(ledger: Any, run_id: str, rank: int) -> RunHistory:
    """Read one rank's stream of ``run_id`` into a :class:`RunHistory`."""
    reader = HistoryReader(run_id, rank)
    for record in ledger.records(run_id, rank):
        reader.take(record)
    return reader.history()


class HistoryReader:
    """A rank's :class:`RunHistory` built record by record, so that a reader following a
    run (the verifier) adds each new record once instead of re-reading the stream."""

    def __init__(self, run_id: str, rank: int) -> None:
        self._history = RunHistory(run_id, rank, {})
        self._start: dict[str, Any] | None = None
        self._sorted = True

    def take(self, record: Any) -> None:
        """Add the stream's next record."""
        history, payload = self._history, record.payload
        run_id, rank = history.run_id, history.rank
        if record.kind == "run-start":
            if self._start is not None:
                raise ReplayError(
                    f"run {run_id!r} stream {rank} was started twice; replay needs one watched "
                    "run per run id"
                )
            self._start = payload
        elif record.kind == "step" and record.step is not None:
            if record.step in history.steps:
                raise ReplayError(f"run {run_id!r} stream {rank} records step {record.step} twice")
            history.steps[record.step] = payload
            history.seqs[record.step] = record.seq
            names = payload.get("optimizer_names")
            if isinstance(names, list):
                history.optimizer_names.append((record.step, [str(n) for n in names]))
        elif record.kind == "checkpoint":
            step, blake3 = payload.get("step"), payload.get("blake3")
            if isinstance(step, int) and isinstance(blake3, str):
                history.checkpoints.append(
                    CheckpointRecord(
                        step,
                        str(payload.get("path", "")),
                        str(payload.get("name", "")),
                        blake3,
                        payload,
                    )
                )
                self._sorted = False
        elif record.kind == "outside-step" and isinstance(record.step, int):
            history.outside.setdefault(record.step, []).append(payload)
        elif record.kind == "alert" and record.step is not None:
            history.alerts.setdefault(record.step, []).append(
                f"{payload.get('rule')}: {payload.get('message')}"
            )

    def history(self) -> RunHistory:
        """The history so far (the same object each time: later records extend it)."""
        history = self._history
        if self._start is None:
            raise ReplayError(
                f"no run-start record for run {history.run_id!r} on stream {history.rank}"
            )
        history.start = self._start
        if not self._sorted:
            history.checkpoints.sort(key=lambda c: c.step)
            self._sorted = True
        return history


def locate(checkpoint: CheckpointRecord, search_dir: str | None) -> str | None:
    """Where the checkpoint file is now: its recorded path, or its name under ``search_dir``."""
    candidates = []
    if search_dir:
        candidates.append(os.path.join(search_dir, checkpoint.name))
    if checkpoint.path:
        candidates.append(checkpoint.path)
    return next((c for c in candidates if os.path.isfile(c)), None)


def resolve_position(value: int | str | None, history: RunHistory, default: int) -> int:
    """A position from ``--from``/``--to``: a step number or a checkpoint file of this run."""
    if value is None:
        return default
    if isinstance(value, int):
        position = value
    elif value.strip().isdigit():
        position = int(value)
    elif os.path.isfile(value):
        from trainguard.monitor.checkpoint import file_digest

        digest, _ = file_digest(value)
        match = [c for c in history.checkpoints if c.blake3 == digest]
        if not match:
            raise UsageError(
                f"{value}: not a checkpoint of run {history.run_id!r} (its BLAKE3 digest is "
                "in no checkpoint record of this run)"
            )
        position = match[-1].step
    else:
        raise UsageError(f"{value!r}: expected a step number or a checkpoint file")
    if position < 0:
        raise UsageError(f"position {position} is negative")
    return position
