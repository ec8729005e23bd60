"""What the learning-rate scheduler must have set: a trusted recomputation.

The guard keeps its own copy of the scheduler (every attribute deep-copied,
bound to a stand-in optimizer holding copies of the param groups' settings).
When the real scheduler has stepped k times since, the copy is stepped k
times too: the learning rates it sets are what the schedule gives, whatever
the real scheduler's ``_last_lr`` says, and the real scheduler's own settings
(gamma, base_lrs, milestones, ...) must still equal the copy's.  Schedulers
whose step needs more than the count (``ReduceLROnPlateau`` needs the metric)
cannot be recomputed: for those the real scheduler's last learning rates are
trusted, as before.

The settings a replayable schedule drives (the learning rate, and any other the copy
has changed since it was taken: OneCycleLR's momentum or betas) are held to the
copy's value at every check, changed or not: a learning rate kept at the last step's
value across a decay boundary equals the old one, and only the schedule says it is
wrong (red team 3: StepLR's halving undone was seen at its next change, 3 steps
late).  What the loop sets itself and declares (``guard.step(lr=...)``) the copy
follows (:meth:`ScheduleModel.follow`): a chainable schedule (StepLR, CosineAnnealingLR)
computes its next value from the group's current one, as the real one does.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

MAX_CATCH_UP = 10_000  # scheduler steps replayed at one check at most


class _Stand:
    """Stands in for the optimizer: only ``param_groups`` (and what step() looks for)."""

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self.param_groups = groups
        self._opt_called = True

    def step(self) -> None:  # pragma: no cover - never called
        return None


_Stand.step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]


class ScheduleModel:
    def __init__(self, scheduler: Any, optimizer: Any) -> None:
        self.real = scheduler
        self.optimizer = optimizer
        self.replayable = hasattr(scheduler, "last_epoch") and not hasattr(scheduler, "patience")
        self._start: list[dict[str, Any]] = []  # the copy's settings when taken
        self._driven: set[str] = {"lr"} if self.replayable else set()
        self.copy = self._clone() if self.replayable else None

    def _clone(self) -> Any:
        groups = [
            {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
        ]
        stand = _Stand(copy.deepcopy(groups))
        self._start = [{k: _plain(v) for k, v in g.items()} for g in stand.param_groups]
        clone = object.__new__(type(self.real))
        clone.__dict__.update(copy.deepcopy(self.real.__dict__, {id(self.optimizer): stand}))
        return clone

    def expected(self) -> list[dict[str, Any]] | None:
        """Each param group's settings as the schedule gives them now (the learning rate,
        and momentum or betas for schedules that cycle them); None when unknown."""
        if self.copy is None:
            try:
                return [{"lr": float(x)} for x in self.real.get_last_lr()]
            except Exception:  # no step taken yet, or not a torch scheduler
                return None
        behind = int(self.real.last_epoch) - int(self.copy.last_epoch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(max(0, min(behind, MAX_CATCH_UP))):
                self.copy.step()
        groups = [{k: _plain(v) for k, v in g.items()} for g in self.copy.optimizer.param_groups]
        for start, now in zip(self._start, groups, strict=False):
            self._driven |= {k for k, v in now.items() if k in start and start[k] != v}
        return groups

    def driven(self) -> set[str]:
        """The settings the schedule sets: held to its value at every check, changed or
        not (empty when it cannot be recomputed: then only changes are judged)."""
        return set(self._driven) if self.copy is not None else set()

    def follow(self, group: int, key: str, value: Any) -> None:
        """The loop set ``key`` of param group ``group`` itself and declared it: the copy
        goes on from that value, as the real schedule does."""
        if self.copy is None:
            return
        groups = self.copy.optimizer.param_groups
        if 0 <= group < len(groups) and key in groups[group]:
            groups[group][key] = value

    def tampered(self) -> list[str]:
        """Settings of the real scheduler that differ from the recomputed copy's."""
        if self.copy is None:
            return []
        mine, theirs = _settings(self.copy), _settings(self.real)
        return [
            f"{k} {mine.get(k)!r} -> {theirs.get(k)!r}"
            for k in sorted(set(mine) | set(theirs))
            if mine.get(k) != theirs.get(k)
        ]

    def resync(self) -> None:
        """Follow the real scheduler from here (after its change was reported)."""
        if self.replayable:
            self.copy = self._clone()


def _plain(v: Any) -> Any:
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    if callable(v):
        # A function or callable object (LambdaLR's lr_lambdas): its repr holds its address,
        # which the copy's deep-copied object does not share; checks/scheduler.py compares
        # what it computes with (code, closure, globals, attributes) by value.
        return f"<callable {type(v).__qualname__}>"
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if hasattr(v, "item") and getattr(v, "numel", lambda: 2)() == 1:
        return v.item()
    return repr(v)


def _settings(scheduler: Any) -> dict[str, Any]:
    skip = ("optimizer", "_last_lr", "_get_lr_called_within_step", "_step_count", "_schedulers")
    out = {}
    for k, v in vars(scheduler).items():
        if k in skip or callable(v):
            continue
        plain = _plain(v)
        if isinstance(plain, (int, float, str, bool, list)) or plain is None:
            out[k] = plain
    return out
