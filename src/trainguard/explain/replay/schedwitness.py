"""The schedule and hyper-parameters a checkpoint restores, held without the segment before.

A checkpoint is held to what replaying the segment before it ends in; where that segment
was not replayed (a verifier's draw skipped it, ``--from`` a later checkpoint) only to the
ledger's digests of the save, which the process wrote in the same breath as the file.  A
``gamma`` raised, ``base_lrs`` or ``weight_decay`` changed in the training process and
saved consistently then replayed clean from the checkpoint on, and was found only with
the segment before (probability ``p`` per checkpoint at rate ``p``).

The invariant here needs no replay of the model: the schedule is a function of its
settings and its step count.  The entry's own fresh scheduler and param groups (the
verifier's trusted code, taken before the checkpoint is loaded into them) are copied onto
a stand-in optimizer, the copy is stepped to the checkpoint's ``last_epoch``, and the
checkpoint must restore exactly that: every scheduler value (``gamma``, ``base_lrs``,
``step_size``, milestones, a lambda object's state, ``T_cur``...), every hyper-parameter of
every param group the entry builds (``betas``, ``weight_decay``, ``eps``, ``momentum``,
and momentum or betas as a cycling schedule sets them).  Since the settings never change
in an honest run, every later checkpoint whose segment after is recomputed names a change
too, not only the next one.

The learning rate is held as well (the group's ``lr`` and ``initial_lr``, the scheduler's
``_last_lr``), which also names a ``last_epoch`` moved to where the schedule gives another
rate, unless the loop sets learning rates itself: when a step before the checkpoint ran
with a rate the schedule gives at no count up to it (a warm-up written by hand, declared
with ``guard.step(lr=...)``), the rate is not held here and a note says so.  Keys the loop
declared changing (TG1316 in the ledger: a weight-decay schedule written by hand) are not
held either.  Not held: a ``last_epoch`` moved within a stretch where the rate stays the
same (StepLR between two decays), ReduceLROnPlateau (its steps need the metric), a
schedule the loop changes on purpose (``guard.step(changed=["scheduler"])``, recorded in
the step record's ``changed``: checkpoints after it are noted, not held), param groups the
loop appended.
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from trainguard.explain.replay.result import FieldDiff
from trainguard.monitor import carried
from trainguard.monitor.schedule import Stand

MAX_SCHEDULE_STEPS = 200_000  # scheduler steps recomputed for one checkpoint at most
LR_KEYS = ("lr", "initial_lr")
LR_STATE = ("_last_lr",)
_DECLARED = re.compile(r"^TG1316: declared hyper-parameter change \(([^)]*)\)")


@dataclass
class Fresh:
    """The entry's scheduler and param groups as it built them, copied before restoring."""

    groups: list[dict[str, Any]]
    scheduler: Any = None  # a copy bound to a stand-in holding ``groups``; None: no scheduler
    why_not: str | None = None  # set: the schedule cannot be recomputed (said in a note)
    lrs: set[tuple[float, ...]] = field(default_factory=set)  # rates the schedule gave


def take(run: Any) -> Fresh:
    """Copy the entry's fresh objects (call before the checkpoint is loaded into them)."""
    groups = copy.deepcopy(
        [{k: v for k, v in g.items() if k != "params"} for g in run.optimizer.param_groups]
    )
    fresh = Fresh(groups)
    real = run.scheduler
    if real is None:
        return fresh
    if not hasattr(real, "last_epoch") or hasattr(real, "patience"):
        fresh.why_not = f"{type(real).__name__} steps on a metric, not a count"
        return fresh
    stand = Stand(fresh.groups)
    memo: dict[int, Any] = {id(run.optimizer): stand}
    try:
        clone = object.__new__(type(real))
        memo[id(real)] = clone
        clone.__dict__.update(copy.deepcopy(real.__dict__, memo))
    except Exception as exc:  # the entry's scheduler holds what cannot be copied
        fresh.why_not = f"{type(real).__name__} cannot be copied ({type(exc).__name__})"
        return fresh
    fresh.scheduler = clone
    return fresh


def check(
    fresh: Fresh, saved: Any, history: Any, position: int, notes: list[str]
) -> FieldDiff | None:
    """The checkpoint at ``position`` against the recomputed schedule (module text)."""
    groups = (
        (saved.optimizer or {}).get("param_groups") if isinstance(saved.optimizer, dict) else None
    )
    if not isinstance(groups, list):
        return None
    changed = _changed_on_purpose(history, position)
    if changed is not None:
        notes.append(
            f"the schedule at the checkpoint at step {position} is not recomputed: the loop "
            f"declared changing it at step {changed} (guard.step(changed=['scheduler']))"
        )
        return None
    if fresh.scheduler is not None:
        why = _step_to(fresh, saved.scheduler)
        if why is not None:
            notes.append(
                f"the schedule at the checkpoint at step {position} is not recomputed: {why}"
            )
            return None
    elif fresh.why_not is not None:
        notes.append(
            f"the schedule at the checkpoint at step {position} is not recomputed: {fresh.why_not}"
        )
    else:
        fresh.lrs.add(_rates(fresh.groups))
    n = len(fresh.groups)
    expected_sched = fresh.scheduler.state_dict() if fresh.scheduler is not None else None
    restored_sched = saved.scheduler if fresh.scheduler is not None else None
    expected = carried.flatten(expected_sched, {"param_groups": fresh.groups}, None, None)
    restored = carried.flatten(restored_sched, {"param_groups": groups[:n]}, None, None)
    names = [
        name
        for name in carried.differences(expected, restored)
        if name.startswith(("scheduler", "optimizer group"))
    ]
    if fresh.why_not is not None:  # a scheduler not recomputed: only the settings it leaves
        names = [m for m in names if m.startswith("optimizer group") and not _lr(m)]
    skip = _declared(history, position)
    names = [m for m in names if not any(m.endswith(f" {k}") for k in skip)]
    if any(_lr(m) for m in names):
        ran = _own_rate(fresh, history, position, n)
        if ran is not None:
            notes.append(
                f"step {ran[0]} ran with learning rates {list(ran[1])}, which the schedule gives "
                "at no step count before it: the loop sets them itself, so the learning rate "
                f"the checkpoint at step {position} restores is not held to the schedule"
            )
            names = [m for m in names if not _lr(m)]
    if not names:
        return None
    return FieldDiff.of_carried("carried-schedule", expected, restored, names)


def _step_to(fresh: Fresh, saved_scheduler: Any) -> str | None:
    """Step the copy to the checkpoint's count, keeping every rate it gives on the way;
    a reason when it cannot be done."""
    target = saved_scheduler.get("last_epoch") if isinstance(saved_scheduler, dict) else None
    clone = fresh.scheduler
    if not isinstance(target, int) or isinstance(target, bool):
        return "the checkpoint's scheduler holds no step count (last_epoch)"
    start = int(clone.last_epoch)
    if not 0 <= target - start <= MAX_SCHEDULE_STEPS:
        return (
            f"its last_epoch {target} is not within {MAX_SCHEDULE_STEPS} steps after the "
            f"entry's fresh scheduler's ({start})"
        )
    fresh.lrs.add(_rates(fresh.groups))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "step() before optimizer.step()": a stand-in
        try:
            for _ in range(target - start):
                clone.step()
                fresh.lrs.add(_rates(fresh.groups))
        except Exception as exc:  # the entry's schedule fails on its own copy
            return f"stepping a copy of it failed ({type(exc).__name__}: {exc})"
    return None


def _rates(groups: list[dict[str, Any]]) -> tuple[float, ...]:
    out = []
    for g in groups:
        try:
            out.append(float(g.get("lr", float("nan"))))
        except (TypeError, ValueError):  # a tensor learning rate: its value
            out.append(float(g["lr"].item()))
    return tuple(out)


def _lr(name: str) -> bool:
    return any(name.endswith(f" {k}") for k in (*LR_KEYS, *LR_STATE))


def _own_rate(
    fresh: Fresh, history: Any, position: int, n: int
) -> tuple[int, tuple[float, ...]] | None:
    """A step before ``position`` whose recorded rates the schedule never gives: the loop
    writes learning rates itself (the first such step and its rates), else None."""
    steps = history.steps
    for s in range(position):
        lrs = (steps.get(s) or {}).get("lr")
        if not isinstance(lrs, list) or len(lrs) < n:
            continue
        try:
            ran = tuple(float(x) for x in lrs[:n])
        except (TypeError, ValueError):
            return s, ()
        if ran not in fresh.lrs:
            return s, ran
    return None


def _changed_on_purpose(history: Any, position: int) -> int | None:
    """The first step before ``position`` whose record says the loop changed the schedule
    on purpose (``changed``: guard.step(changed=["scheduler"]))."""
    for step in sorted(s for s in history.steps if s < position):
        if "scheduler" in (history.steps[step].get("changed") or ()):
            return int(step)
    return None


def _declared(history: Any, position: int) -> set[str]:
    """The keys the loop declared changing (TG1316) at any step before ``position``: not
    held (a weight-decay schedule the loop writes itself).  Step records carry them
    (``hyper_changed``); a ledger of an older trainguard only in the alert's text."""
    keys: set[str] = set()
    for step, record in history.steps.items():
        if step < position:
            keys.update(str(k) for k in record.get("hyper_changed") or ())
    for texts in history.alerts.values():
        for text in texts:
            m = _DECLARED.match(str(text))
            if m:
                keys.update(k.strip() for k in m.group(1).split(",") if k.strip())
    return keys
