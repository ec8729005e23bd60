"""The contract between ``trainguard replay`` and the user's training code.

The entry point is a function ``build(ctx)`` in the user's code, named as
``module:function`` (or ``path/to/file.py:function``).  For each segment it
replays, trainguard calls it with a :class:`ReplayContext` and expects the
pieces of the training run back, as a :class:`Replayable` or a dict with the
same keys:

``model``, ``optimizer``, ``scheduler`` (optional)
    freshly built, as in training.  Their states are then loaded from the
    checkpoint by trainguard; the entry need not restore anything.
``batches``
    an iterable of the batches of steps ``ctx.start``, ``ctx.start + 1``, …
    trainguard calls ``iter()`` on it only after restoring the random states,
    so a data loader's shuffle draws the same numbers as in training.
    :func:`epochs_from` turns a per-epoch loader into one.
``step``
    ``step(batch)`` runs one training step (forward, backward, clipping,
    ``optimizer.step()``, ``scheduler.step()``) and returns the loss: the loop
    body between fetching a batch and ``guard.step``.  It must not call the
    guard; trainguard calls ``guard.step(loss=..., batch=...)`` after it.
``record_batch`` (optional)
    what the training loop passed to ``guard.step(batch=...)``, given the
    batch (default: the batch itself).
``dataloader`` (optional)
    the data loader behind ``batches``: its generator states and epoch at the
    end of a replayed segment are then held to what the next checkpoint
    restores.  When its dataset is a
    :class:`~trainguard.data.sealed.SealedDataset` (built with ``rank=ctx.rank``),
    each step's samples are also checked against the signed manifest and the
    seed's order, and a difference names the sample, its shard and the rank
    (docs/data.md).

Weights written between steps on purpose (SAM, Lookahead), declared in
training with ``with guard.outside_step("sam"):``, are declared in the entry's
``step`` with ``with ctx.outside_step("sam"):`` at the same place: replay then
redoes the declared work under its own guard and holds each window's record
(reason, tensors written, the weights' digest after it) to the ledger's.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from trainguard.errors import UsageError
from trainguard.explain.replay.ledger import ReplayError


@dataclass(frozen=True)
class ReplayContext:
    """What the entry point is told about the segment it builds a run for."""

    run_id: str
    rank: int
    start: int  # the first step replayed: the run has done this many steps
    stop: int  # replay ends before this step
    checkpoint: str | None  # the checkpoint file restored after build (None: the start)
    data_state: Any  # what training passed as guard.checkpoint(data_state=...)
    loader_state: dict[str, Any] | None  # read from the guard's data loader, if it had one
    # The replay's guard while the steps run (set by the engine): ctx.outside_step uses it.
    guard_slot: list[Any] = field(default_factory=list, repr=False, compare=False)

    def outside_step(self, reason: str = "declared") -> AbstractContextManager[None]:
        """``with ctx.outside_step("sam"):`` where training wrote ``with
        guard.outside_step("sam"):``, inside ``step``: the declared window is redone under
        replay's guard and its record compared with the ledger's (docs/replay.md)."""
        if not self.guard_slot:
            raise ReplayError(
                "ctx.outside_step() is for the entry's step function, while replay runs it"
            )
        return self.guard_slot[0].outside_step(reason)  # type: ignore[no-any-return]


@dataclass
class Replayable:
    model: Any
    optimizer: Any
    batches: Iterable[Any]
    step: Callable[[Any], Any]
    scheduler: Any = None
    record_batch: Callable[[Any], Any] | None = None
    dataloader: Any = None
    # The verifier's word that the training loop draws from the global generators between
    # its last step and a save (an evaluation) that ``step`` does not redo: such a move,
    # with no re-seed, is then noted rather than not comparable (docs/replay.md).
    draws_before_saves: bool = False
    # The data state the entry's objects are in, as the loop passes it to
    # guard.checkpoint(data_state=...): each checkpoint's is held to it (datawitness.py).
    data_state: Callable[[], Any] | None = None


Entry = Callable[[ReplayContext], "Replayable | Mapping[str, Any]"]


def as_replayable(built: Any) -> Replayable:
    if isinstance(built, Replayable):
        return built
    if isinstance(built, Mapping):
        known = {"model", "optimizer", "batches", "step", "scheduler", "record_batch", "dataloader",
                 "draws_before_saves", "data_state"}  # fmt: skip
        extra = sorted(set(built) - known)
        missing = sorted({"model", "optimizer", "batches", "step"} - set(built))
        if extra or missing:
            raise ReplayError(
                "the entry point's dict "
                + (f"lacks {', '.join(missing)}" if missing else "")
                + ("; " if extra and missing else "")
                + (f"has unknown keys {', '.join(map(str, extra))}" if extra else "")
                + " (see docs/replay.md)"
            )
        return Replayable(**built)
    raise ReplayError(
        f"the entry point returned a {type(built).__name__}; expected a Replayable or a dict "
        "with model, optimizer, batches, step (see docs/replay.md)"
    )


def epochs_from(
    start: int, steps_per_epoch: int, epoch: Callable[[int], Iterable[Any]]
) -> Iterator[Any]:
    """The batches of steps ``start``, ``start + 1``, … for a loop over epochs.

    ``epoch(e)`` gives epoch ``e``'s batches (a data loader whose generator you
    seed from ``e``, say); the first ``start % steps_per_epoch`` batches of the
    first epoch are read and dropped.  Lazy: nothing is drawn until iterated.

    Starting mid-epoch, the epoch's iterator is made and its first batches dropped
    with the global random states (torch, Python, NumPy) put back afterwards: the
    loop made those draws before the checkpoint at ``start``, whose random states
    already hold them.  A ``DataLoader`` with no generator of its own (a sampler
    seeded by ``set_epoch``) draws its workers' base seed from torch's global
    generator on every ``iter()``, and a dataset may draw in ``__getitem__``:
    drawn again here, they moved every later dropout mask and random draw off the
    run's (an honest run resumed mid-epoch diverged at its first step).
    """
    if steps_per_epoch <= 0:
        raise UsageError("steps_per_epoch must be positive")
    e, skip = divmod(start, steps_per_epoch)
    while True:
        if skip:
            it = _skipped_into(epoch(e), skip, e, start)
            skip = 0
        else:
            it = iter(epoch(e))
        yield from it
        e += 1


def _skipped_into(batches: Iterable[Any], skip: int, e: int, start: int) -> Iterator[Any]:
    """``batches``' iterator with its first ``skip`` batches dropped, the global random
    states as they were before (see :func:`epochs_from`)."""
    from trainguard.monitor.checkpoint import random_states, restore_random_states

    before = random_states()
    try:
        it = iter(batches)
        for i in range(skip):
            if next(it, _END) is _END:
                raise ReplayError(f"epoch {e} ended after {i} batches, before step {start}")
    finally:
        restore_random_states(before)
    return it


_END = object()


def load_entry(spec: str) -> Entry:
    """The function named by ``module:function`` or ``path/to/file.py:function``."""
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise UsageError(f"--entry {spec!r}: expected module:function or file.py:function")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = os.path.abspath(module_name)
            if not os.path.isfile(path):
                raise UsageError(f"--entry: {module_name}: no such file")
            name = "trainguard_replay_entry_" + os.path.splitext(os.path.basename(path))[0]
            loader_spec = importlib.util.spec_from_file_location(name, path)
            if loader_spec is None or loader_spec.loader is None:
                raise UsageError(f"--entry: cannot import {module_name}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())  # as `python -m` does
            module = importlib.import_module(module_name)
    except UsageError:
        raise
    except Exception as exc:
        raise ReplayError(f"--entry {spec}: import raised {type(exc).__name__}: {exc}") from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise UsageError(f"--entry {spec}: {module_name} has no function {func_name!r}")
    return func  # type: ignore[no-any-return]
