"""What a checkpoint must restore, and restoring it.

Each checkpoint is held to the best witness of the state at its position:
what replaying the segment before it ended in (weights, optimizer state and
the state it carries besides them, :mod:`trainguard.monitor.carried`), else
the ledger: the step record's digests of the weights and optimizer state (or,
after a sampled step of ``watch(budget=...)``, the checkpoint record's own),
and the checkpoint record's digests of the carried state.  The first witness
is a recomputation; the second only catches edits made after the save.
"""

from __future__ import annotations

from typing import Any

from trainguard.explain.replay import sharded
from trainguard.explain.replay.entry import Replayable
from trainguard.explain.replay.ledger import CheckpointRecord, ReplayError, RunHistory
from trainguard.explain.replay.result import FieldDiff
from trainguard.monitor import carried
from trainguard.monitor import checkpoint as ckpt

Carried = dict[str, dict[str, str]]


class Held:
    """The replay's end states by position, and what a checkpoint is compared with."""

    def __init__(self, history: RunHistory) -> None:
        self.history = history
        self.records = {c.step: c for c in history.checkpoints}
        self.ends: dict[int, Carried] = {}  # position -> carried state a replay ended in
        self.end_digests: dict[int, dict[str, Any]] = {}  # ... and its weights' digests
        self.end_random: dict[int, dict[str, Any]] = {}  # ... and its generators' states

    def remember(
        self, position: int, state: tuple[Carried, dict[str, Any]], last: dict[str, Any]
    ) -> None:
        """A replayed segment ended at ``position`` in ``state`` (:func:`end_state`);
        ``last`` is the replay guard's record of the step before it."""
        self.ends[position], self.end_random[position] = state
        plain, tensors = last.get("plain") or {}, last.get("tensors") or {}
        self.end_digests[position] = {
            "params": last.get("after"),
            "optimizer": last.get("optimizer"),
            "plain": {"params": plain.get("after"), "optimizer": plain.get("optimizer")},
            "tensors": {"params": tensors.get("after"), "optimizer": tensors.get("optimizer")},
        }

    def state(self, position: int) -> dict[str, Any]:
        """Digests the weights and optimizer state restored at ``position`` must have."""
        if position in self.end_digests:
            return self.end_digests[position]
        state = self.history.state_at(position)
        record = self.records.get(position)
        if state.get("params") is None and position > 0 and record is not None:
            p = record.payload
            plain = p.get("plain") or {}
            return {
                "params": p.get("params"),
                "optimizer": p.get("optimizer"),
                "plain": {"params": plain.get("params"), "optimizer": plain.get("optimizer")},
                "tensors": {},
            }
        return state

    def carried(
        self, position: int, record: CheckpointRecord, saved: ckpt.Checkpoint, notes: list[str]
    ) -> FieldDiff | None:
        """The checkpoint's carried state against the replay that ended here, else the ledger.

        A generator that only moved on (no re-seed shows, :func:`carried.reseeded`) is noted
        in ``notes``, not a difference: honest loops draw numbers between a step and a save.
        """
        restored = carried.of_checkpoint(saved)
        end = self.ends.get(position)
        if end is not None:
            names = carried.differences(end, restored)
            moved = [n for n in names if self._moved_only(position, n, saved)]
            if moved:
                notes.append(
                    f"the checkpoint at step {position} holds other states of {', '.join(moved)} "
                    "than replaying up to it ends in, with no sign of a re-seed: the loop drew "
                    "random numbers between the last step and the save (an evaluation?); "
                    "the steps after it replay from the checkpoint's states"
                )
            return difference(end, restored, [n for n in names if n not in moved])
        recorded = record.payload.get("carried")
        if not isinstance(recorded, dict):
            return None  # an older trainguard recorded no carried state
        now = carried.digests(restored)
        parts = carried.digest_differences(recorded, now)
        if not parts:
            return None
        return FieldDiff(
            "carried-ledger",
            {p: recorded.get(p) for p in parts},
            {p: now[p] for p in parts},
            tuple(parts),
        )

    def _moved_only(self, position: int, name: str, saved: ckpt.Checkpoint) -> bool:
        raw = self.end_random.get(position) or {}
        if name.startswith("rng "):
            generator = name.removeprefix("rng ")
            a, b = (raw.get("rng") or {}).get(generator), saved.rng.get(generator)
        elif name in ("data loader generator", "data loader sampler_generator"):
            key = name.rpartition(" ")[2]
            a = (raw.get("loader") or {}).get(key)
            b = (saved.data.get("loader") or {}).get(key)
        else:
            return False
        return a is not None and b is not None and not carried.reseeded(a, b)


def end_state(run: Replayable) -> tuple[Carried, dict[str, Any]]:
    """The replay's carried state at the end of a segment, and its generators' raw states."""
    scheduler = run.scheduler.state_dict() if run.scheduler is not None else None
    loader = ckpt.loader_state(run.dataloader) if run.dataloader is not None else None
    states = ckpt.random_states()
    flat = carried.flatten(scheduler, run.optimizer.state_dict(), states, loader)
    return flat, {"rng": states, "loader": loader}


def fresh_state(run: Replayable) -> Carried:
    """The configuration of what the entry just built (scheduler, hyper-parameters): the
    state before step 0.  Random and data-loader states before the first checkpoint are the
    training script's business (it may seed them after building) and are not held to."""
    scheduler = run.scheduler.state_dict() if run.scheduler is not None else None
    return carried.flatten(scheduler, run.optimizer.state_dict(), None, None)


def difference(
    expected: Carried, restored: Carried, names: list[str] | None = None
) -> FieldDiff | None:
    """A "carried" difference naming each value (``scheduler gamma``), or None.

    ``names``: the differing values to report (default: every one that differs)."""
    if names is None:
        names = carried.differences(expected, restored)
    if not names:
        return None
    flat_a = {n: v for part in expected.values() for n, v in part.items()}
    flat_b = {n: v for part in restored.values() for n, v in part.items()}
    return FieldDiff(
        "carried",
        {n: flat_a.get(n) for n in names},
        {n: flat_b.get(n) for n in names},
        tuple(names),
    )


def restore(run: Replayable, saved: ckpt.Checkpoint) -> None:
    """Load the checkpoint's states into what the entry built (a sharded one's slices into
    the entry's sharded model, :mod:`.sharded`)."""
    model, optimizer = sharded.restorable(run.model, run.optimizer, saved)
    run.model.load_state_dict(model)
    run.optimizer.load_state_dict(optimizer)
    if saved.scheduler is not None:
        if run.scheduler is None:
            raise ReplayError("the checkpoint holds a scheduler state; the entry built none")
        run.scheduler.load_state_dict(saved.scheduler)
