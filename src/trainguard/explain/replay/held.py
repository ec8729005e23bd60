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

import random
from typing import Any

from trainguard.explain.replay import datawitness, schedwitness, sharded
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
        # Checkpoints whose only difference is generators moved on without a re-seed: the
        # loop drew between the step and the save; not comparable rather than sabotage.
        self.drawn: set[int] = set()
        # Position -> fingerprints (keyed, plain) of the batch the replay's own data would
        # give next (A16: the data position a checkpoint restores is held to it).
        self.next_batch: dict[int, tuple[str, str]] = {}
        # Checkpoints whose data position the segment before reaches and the entry cannot
        # resume from (A28: outside the data contract): not comparable.
        self.unresumable: set[int] = set()
        # Segment start -> where the entry's step reaches the generators it restored the
        # checkpoint's data_state into (datawitness.bind): read again at the segment's end.
        self.bindings: dict[int, dict[str, datawitness.Locator]] = {}

    def drawn_only(self, divergence: Any) -> bool:
        """Whether a checkpoint divergence is only such moved generators (:meth:`carried`)."""
        step = divergence.step
        return bool(
            divergence.kind == "checkpoint" and (step in self.drawn or step in self.unresumable)
        )

    def explained(self, divergence: Any) -> Any:
        """A not-comparable checkpoint (:meth:`drawn_only`) with the cause that says why."""
        import dataclasses

        if divergence.step in self.unresumable:
            why = (
                "the entry cannot resume the data at this checkpoint: its first batch is not "
                "the one training read there, which replaying up to it does read next (a "
                "loader whose generator is seeded once draws its next epoch's order after "
                "the save: outside the data contract, docs/replay.md; seed it per epoch)"
            )
        else:
            why = (
                "random generators moved between the last step and the save with no sign "
                "of a re-seed, by draws replay does not redo (an evaluation?): keep them off "
                "the training's generators, have the entry's step redo them, or declare "
                "them (Replayable.draws_before_saves); docs/replay.md"
            )
        return dataclasses.replace(divergence, cause=why)

    def data_position(
        self, position: int, first: tuple[str, str], recorded: dict[str, Any], mode: str
    ) -> FieldDiff | None:
        """The data position the checkpoint at ``position`` restores, against the replay
        that ended there: the entry's first batch from the checkpoint (``first``, keyed and
        plain fingerprints) must be the batch the segment before continues with.

        Where the two differ and the run's own record of that step holds the segment
        before's batch, training went on where recomputation says, and it is the entry
        that cannot resume from the checkpoint (a loader whose generator is seeded once
        draws the next epoch's order after the save): not comparable, outside the data
        contract (docs/replay.md).  Otherwise the checkpoint's data state (``data_state``,
        the loader's) moved the position: a difference.
        """
        witness = self.next_batch.get(position)
        index = 0 if mode == "keyed" else 1  # without the run's key each guard draws its own
        if witness is None or witness[index] == first[index]:
            return None
        ran = (
            recorded.get("batch") if mode == "keyed" else (recorded.get("plain") or {}).get("batch")
        )
        if ran is not None and ran == witness[index]:
            self.unresumable.add(position)
        return FieldDiff("carried", {"data position": witness[index]},
                         {"data position": first[index]}, ("data position",))  # fmt: skip

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

    def restored(self, saved: ckpt.Checkpoint, whole: bool = False) -> Carried:
        """What ``saved`` restores besides the fingerprinted weights, its buffers included
        (every model entry that is not one of the run's parameters); ``whole``: every
        model entry, the weights too, and the optimizer's state (the first checkpoint, held
        to the entry's build)."""
        parts = carried.of_checkpoint(saved, () if whole else self.history.param_names)
        return {**parts, **datawitness.optimizer_part(saved.optimizer)} if whole else parts

    def carried(
        self, position: int, record: CheckpointRecord, saved: ckpt.Checkpoint, notes: list[str]
    ) -> FieldDiff | None:
        """The checkpoint's carried state against the replay that ended here, else the ledger.

        Exact: a generator that moved on between the last step and the save (an evaluation
        drawing from the global generators) is a difference like any other value, since
        the replay cannot redo those draws and the moved state picks every later random
        number (A06: the position can be ground for chosen dropout masks).  Where nothing
        shows a re-seed, the difference says so (:data:`DRAWN`): the engine reports it as
        not comparable (exit 2), not as sabotage.  Honest loops keep evaluation draws off
        the training generators (``torch.random.fork_rng()``, a ``torch.Generator`` of
        their own), and then match exactly.
        """
        restored = self.restored(saved)
        end = self.ends.get(position)
        if end is not None:
            names = carried.differences(end, restored)
            if not names:
                return None
            diff = difference(end, restored, names)
            # Only the global generators: an evaluation draws from them; a data loader's
            # own generator moved before a save picks the next epoch's order (A28).
            if all(n.startswith("rng ") and self._moved_only(position, n, saved) for n in names):
                assert diff is not None
                if (self.end_random.get(position) or {}).get("draws_before_saves"):
                    notes.append(
                        f"the checkpoint at step {position} holds other states of "
                        f"{', '.join(names)} than replaying up to it ends in, with no sign of "
                        "a re-seed: the entry declares draws between the last step and a "
                        "save (draws_before_saves), which replay does not redo; the steps "
                        "after it replay from the checkpoint's states"
                    )
                    return None
                self.drawn.add(position)
                notes.append(
                    f"the checkpoint at step {position} holds other states of "
                    f"{', '.join(names)} than replaying up to it ends in, with no sign of a "
                    "re-seed: the loop drew random numbers between the last step and the "
                    "save, which replay cannot redo (docs/replay.md: keep such draws off "
                    "the training's generators)"
                )
            return diff
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

    def since_last_step(
        self, position: int, saved: ckpt.Checkpoint, declared: bool, notes: list[str]
    ) -> FieldDiff | None:
        """Where the segment before ``position`` was not replayed (a verifier's draw
        skipped it), the global generators the checkpoint restores against the digests the
        record of the step before it took (after that step's forward and backward).

        Nothing honest draws between there and the save but an evaluation kept off the
        training's generators (``fork_rng``): a generator that moved is a difference, named
        a re-seed (diverged) when torch's shows one by itself (its seed is not the run's,
        or its state is a freshly seeded one) or Python's or NumPy's stands where seeding
        leaves it (:func:`carried.freshly_seeded`), else not comparable (:attr:`drawn`), or a
        note where the entry declares such draws (``draws_before_saves``).  Without this a
        generator re-seeded right before a save was found only when the segment before
        the checkpoint was drawn (docs/verifier.md, "Cost and the rate")."""
        if position == 0 or position in self.ends:
            return None
        taken = (self.history.steps.get(position - 1) or {}).get("rng")
        if not isinstance(taken, dict) or not taken:
            return None  # a budget run's unread step: the record holds no digests
        now = _digests_of(saved.rng)
        names = [f"rng {g}" for g in ("torch", "python", "numpy", "cuda")
                 if g in taken and g in now and taken[g] != now[g]]  # fmt: skip
        if not names:
            return None
        diff = FieldDiff(
            "carried-step",
            {n: taken[n[4:]] for n in names},
            {n: now[n[4:]] for n in names},
            tuple(names),
        )
        if _torch_reseeded(saved.rng.get("torch"), self.history.start.get("initial_seed")) or any(
            carried.freshly_seeded(saved.rng.get(g))
            for g in ("python", "numpy")
            if f"rng {g}" in names
        ):
            return diff  # a re-seed: only seeding reaches a freshly seeded state
        if declared:
            notes.append(
                f"the checkpoint at step {position} holds other states of {', '.join(names)} "
                f"than the record of step {position - 1} took, with no sign of a re-seed: the "
                "entry declares draws between the last step and a save (draws_before_saves)"
            )
            return None
        self.drawn.add(position)
        return diff

    def schedule(
        self, run: Replayable, saved: ckpt.Checkpoint, position: int, notes: list[str]
    ) -> FieldDiff | None:
        """Where the segment before ``position`` was not replayed: the scheduler and
        hyper-parameters the checkpoint restores against the entry's fresh ones stepped to
        its count (:mod:`.schedwitness`).  Call before restoring into ``run``."""
        if position == 0 or position in self.ends:
            return None
        return schedwitness.check(schedwitness.take(run), saved, self.history, position, notes)

    def _moved_only(self, position: int, name: str, saved: ckpt.Checkpoint) -> bool:
        """Whether the global generator ``name`` saved shows no re-seed."""
        generator = name.removeprefix("rng ")
        raw = (self.end_random.get(position) or {}).get("rng") or {}
        a, b = raw.get(generator), saved.rng.get(generator)
        return a is not None and b is not None and not carried.reseeded(a, b)


def peek(batches: Any) -> Any:
    """The next batch, or None where the data ends there or cannot be read (no witness)."""
    try:
        return next(batches, None)
    except Exception:  # the entry's data, past the range: no witness, not a replay error
        return None


def batch_print(guard: Any, batch: Any) -> tuple[str, str]:
    """A batch's fingerprints (keyed, plain), as the guard takes them for a step record."""
    from trainguard.monitor.setup import tensors_in

    fp = guard.fp.fingerprint((str(i), t) for i, t in enumerate(tensors_in(batch, guard.torch)))
    return fp.digest, fp.plain


def _buffers(run: Replayable) -> dict[str, Any]:
    """The model's non-parameter entries (as each rank holds them, under FSDP2)."""
    from trainguard.monitor import sharding

    state, _ = sharding.local_state(run.model.state_dict())
    return carried.buffers_of(state, (n for n, _ in run.model.named_parameters()))


def end_state(
    run: Replayable, binding: dict[str, datawitness.Locator] | None = None
) -> tuple[Carried, dict[str, Any]]:
    """The replay's carried state at the end of a segment, and its generators' raw states;
    the data state too where the entry lets replay read it (:mod:`.datawitness`)."""
    scheduler = run.scheduler.state_dict() if run.scheduler is not None else None
    loader = ckpt.loader_state(run.dataloader) if run.dataloader is not None else None
    states = ckpt.random_states()
    flat = carried.flatten(
        scheduler, run.optimizer.state_dict(), states, loader, None, _buffers(run)
    )
    flat.update(datawitness.expected(run, binding or {}))
    declared = bool(getattr(run, "draws_before_saves", False))
    return flat, {"rng": states, "loader": loader, "draws_before_saves": declared}


def fresh_state(run: Replayable, scrambled: dict[str, Any] | None = None) -> Carried:
    """What the entry just built: the state before step 0, which the first checkpoint must
    restore (A02: weights or a seed set before it were taken on trust).  The whole model
    (weights and buffers, exact bytes), the scheduler and hyper-parameters, and each global
    generator the entry seeds: ``scrambled`` holds the states :func:`scramble` put there
    before the entry ran, and a generator still reachable from its scrambled state was left
    alone by the entry (the training script's own business: the checkpoint's is restored).
    The optimizer's state too (a fresh optimizer has none: state pre-filled before the first
    checkpoint, V2, was restored as the start).  Data loaders' generators before the first
    checkpoint are not held to."""
    from trainguard.monitor import sharding

    scheduler = run.scheduler.state_dict() if run.scheduler is not None else None
    model, _ = sharding.local_state(run.model.state_dict())
    random_states = None
    if scrambled is not None:
        now = ckpt.random_states()
        random_states = {
            name: now[name]
            for name in ("torch", "python", "numpy")
            if name in now and name in scrambled and carried.reseeded(scrambled[name], now[name])
        }
    parts = carried.flatten(
        scheduler, run.optimizer.state_dict(), random_states, None, None, dict(model)
    )
    return {**parts, **datawitness.optimizer_part(run.optimizer.state_dict())}


def scramble() -> dict[str, Any]:
    """Seed the global generators (torch's CPU one, Python's, NumPy's) with fresh random
    seeds before the entry builds, so that :func:`fresh_state` tells a generator the entry
    seeds from one it leaves alone; returns the states set."""
    import secrets

    import torch

    torch.default_generator.manual_seed(secrets.randbits(63))  # not torch.manual_seed: no CUDA
    random.seed(secrets.randbits(64))
    try:
        import numpy as np

        np.random.seed(secrets.randbits(32))
    except ImportError:
        pass
    return ckpt.random_states()


def difference(
    expected: Carried, restored: Carried, names: list[str] | None = None
) -> FieldDiff | None:
    """A "carried" difference naming each value (``scheduler gamma``), or None.

    ``names``: the differing values to report (default: every one that differs)."""
    if names is None:
        names = carried.differences(expected, restored)
    if not names:
        return None
    return FieldDiff.of_carried("carried", expected, restored, names)


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


def _digests_of(states: dict[str, Any]) -> dict[str, str]:
    """The digests a step record takes (monitor/rng.py) of the random ``states`` a
    checkpoint saved: set for the moment, read, and put back."""
    from trainguard.monitor import rng

    before = ckpt.random_states()
    try:
        ckpt.restore_random_states(states)
        return rng.state_digests()
    finally:
        ckpt.restore_random_states(before)


def _torch_reseeded(state: Any, initial_seed: Any) -> bool:
    """Whether torch's saved CPU generator shows a re-seed by itself: a seed other than
    the one the run started with, or the state right after seeding."""
    import torch

    if not isinstance(state, torch.Tensor) or state.numel() != carried.TORCH_CPU_STATE_BYTES:
        return False
    seed = int.from_bytes(bytes(state.view(-1)[:8].tolist()), "little")
    fresh = torch.Generator().manual_seed(seed).get_state()
    return (isinstance(initial_seed, int) and seed != initial_seed) or bool(
        torch.equal(state, fresh)
    )
