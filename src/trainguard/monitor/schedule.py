"""What the learning-rate schedulers must have set: a trusted recomputation.

The guard keeps its own copy of the schedulers of one optimizer (every attribute
deep-copied, bound to a stand-in optimizer holding copies of the param groups'
settings).  Each real scheduler's ``step`` calls are logged with their arguments
(monitor/schedcalls.py) and the copy replays exactly those calls, in their order: the
learning rates it sets are what the schedule gives, whatever the real schedulers'
``_last_lr`` says, with the epoch a loop passes (``CosineAnnealingWarmRestarts.step(
epoch + i / iters)``), the metric ``ReduceLROnPlateau`` is given, and two schedulers on
one optimizer (a per-step warm-up and a per-epoch decay) composed as torch composes
them: each computes from the rate the other left in the param group.

After the replay the real schedulers' whole state (torch's ``state_dict()``: counters,
settings, a callable object's attributes; not ``_last_lr``, which the param groups are
compared for) must equal the copy's.  What no logged call explains is someone else's:
``last_epoch`` rewound or moved one ahead, ``T_cur`` or ``gamma`` written, a call that
went around the logging (the class's own ``step`` called directly).

A scheduler that cannot be observed (its class cannot be swapped) is caught up by the
count, as before: stepped as often as its ``last_epoch`` moved, its settings compared
(not its counters); one without ``last_epoch`` (not a torch scheduler) is trusted: its
``get_last_lr()`` is what it set.

The settings a replayable schedule drives (the learning rate, and any other the copy
has changed since it was taken: OneCycleLR's momentum or betas) are held to the
copy's value at every check, changed or not: a learning rate kept at the last step's
value across a decay boundary equals the old one, and only the schedule says it is
wrong (red team 3).  What the loop sets itself and declares (``guard.step(lr=...)``)
the copy follows (:meth:`ScheduleModel.follow`): a chainable schedule (StepLR,
CosineAnnealingLR) computes its next value from the group's current one, as the real
one does.
"""

from __future__ import annotations

import copy
import functools
import types
import warnings
from typing import Any, Literal

from trainguard.monitor import schedcalls

MAX_CATCH_UP = 10_000  # scheduler steps replayed at one check at most (count mode)
MAX_DEPTH = 6  # levels of a scheduler's state compared (SequentialLR nests its children)
UNREPLAYED = ("_last_lr",)  # derived from the param groups, which are compared themselves


class Schedulers(list[Any]):
    """Several schedulers stepping one optimizer (``watch(scheduler=[warmup, decay])``);
    a checkpoint saves each one's ``state_dict()``."""

    def state_dict(self) -> dict[str, Any]:
        return {"schedulers": [s.state_dict() for s in self]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for s, saved in zip(self, state["schedulers"], strict=True):
            s.load_state_dict(saved)


def as_list(scheduler: Any) -> list[Any]:
    if scheduler is None:
        return []
    return list(scheduler) if isinstance(scheduler, list) else [scheduler]


class Stand:
    """Stands in for the optimizer: only ``param_groups`` (and what step() looks for);
    replay's schedule witness uses it too (explain/replay/schedwitness.py)."""

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self.param_groups = groups
        self._opt_called = True

    def step(self) -> None:  # pragma: no cover - never called
        return None


Stand.step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]


class ScheduleModel:
    def __init__(self, scheduler: Any, optimizer: Any) -> None:
        self.reals = as_list(scheduler)
        self.optimizer = optimizer
        self.log = schedcalls.CallLog()
        self.mode: Literal["calls", "count", "trust"] = "trust"
        if all(_replayable(s) for s in self.reals):
            done = [schedcalls.observe(s, self.log, i) for i, s in enumerate(self.reals)]
            if all(done):
                self.mode = "calls"
            else:
                self.release()
                self.log = schedcalls.CallLog()
        if self.mode == "trust" and len(self.reals) == 1:
            real = self.reals[0]
            if hasattr(real, "last_epoch") and not hasattr(real, "patience"):
                self.mode = "count"  # ReduceLROnPlateau needs the metric
        self._start: list[dict[str, Any]] = []  # the copy's settings when taken
        self._driven: set[str] = {"lr"} if self.mode != "trust" else set()
        self.copies = self._clone()

    @property
    def observed(self) -> bool:
        return self.mode == "calls"

    def _clone(self) -> list[Any]:
        if self.mode == "trust":
            return []
        groups = [
            {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups
        ]
        stand = Stand(copy.deepcopy(groups))
        self._start = [{k: _plain(v) for k, v in g.items()} for g in stand.param_groups]
        memo: dict[int, Any] = {id(self.optimizer): stand}
        clones: list[Any] = []
        for s in self.reals:
            memo[id(getattr(s, "optimizer", None))] = stand  # Accelerate's wrapper: the same
            clones.append(object.__new__(schedcalls.original_class(s)))
            memo[id(s)] = clones[-1]  # one registered scheduler chaining another: its copy
        for s, c in zip(self.reals, clones, strict=True):
            c.__dict__.update(copy.deepcopy(s.__dict__, memo))
        return clones

    def catch_up(self) -> None:
        """Replay on the copy what the real schedulers did since the last call."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.mode == "calls":
                for call in self.log.take():
                    self.copies[call.which].step(*call.args, **call.kwargs)
            elif self.mode == "count":
                real, mine = self.reals[0], self.copies[0]
                behind = int(real.last_epoch) - int(mine.last_epoch)
                for _ in range(max(0, min(behind, MAX_CATCH_UP))):
                    mine.step()

    def behind(self) -> bool:
        """A real scheduler stepped since the copy last caught up."""
        if self.mode == "calls":
            return bool(self.log.pending)
        if self.mode == "count":
            return int(self.reals[0].last_epoch) != int(self.copies[0].last_epoch)
        return False

    def expected(self) -> list[dict[str, Any]] | None:
        """Each param group's settings as the schedule gives them now (the learning rate,
        and momentum or betas for schedules that cycle them); None when unknown."""
        if self.mode == "trust":
            try:
                return [{"lr": float(x)} for x in self.reals[0].get_last_lr()]
            except Exception:  # several, no step taken yet, or not a torch scheduler
                return None
        self.catch_up()
        groups = [
            {k: _plain(v) for k, v in g.items()} for g in self.copies[0].optimizer.param_groups
        ]
        for start, now in zip(self._start, groups, strict=False):
            self._driven |= {k for k, v in now.items() if k in start and start[k] != v}
        return groups

    def driven(self) -> set[str]:
        """The settings the schedule sets: held to its value at every check, changed or
        not (empty when it cannot be recomputed: then only changes are judged)."""
        return set(self._driven) if self.copies else set()

    def follow(self, group: int, key: str, value: Any) -> None:
        """The loop set ``key`` of param group ``group`` itself and declared it: the copy
        goes on from that value, as the real schedule does."""
        if not self.copies:
            return
        groups = self.copies[0].optimizer.param_groups
        if 0 <= group < len(groups) and key in groups[group]:
            groups[group][key] = value

    def tampered(self) -> list[str]:
        """What of the real schedulers differs from the recomputed copy (after catching
        the copy up): ``"gamma 0.5 -> 0.9"``, ``"last_epoch 7 -> 8"``."""
        if self.mode == "trust":
            return []
        self.catch_up()
        out = []
        if self.log.overflowed:
            out.append(f"more than {schedcalls.MAX_PENDING} scheduler steps between two checks")
        for real, mine in zip(self.reals, self.copies, strict=True):
            if self.mode == "calls":
                theirs, ours = _state(real), _state(mine)
            else:  # counted: its counters follow the real one's; compare its settings
                theirs, ours = _settings(real), _settings(mine)
            name = f"{type(real).__name__} " if len(self.reals) > 1 else ""
            out += [
                f"{name}{k} {_shown(ours.get(k))} -> {_shown(theirs.get(k))}"
                for k in sorted(set(ours) | set(theirs), key=str)
                if ours.get(k) != theirs.get(k)
            ]
        return out

    def resync(self) -> None:
        """Follow the real schedulers from here (after their change was reported)."""
        self.log.take()
        self.log.overflowed = False
        self.copies = self._clone()

    def release(self) -> None:
        """Stop observing the schedulers (the guard closes)."""
        self.log.closed = True
        for s in self.reals:
            schedcalls.release(s)


def _replayable(scheduler: Any) -> bool:
    """A scheduler whose copy can replay its calls: it steps the param groups of an
    ``optimizer`` it holds.  Not a wrapper holding the scheduler that does
    (Accelerate's ``AcceleratedScheduler`` steps it as often as there are processes,
    through state shared with the rest of the run): its ``get_last_lr()`` is trusted."""
    return (
        hasattr(scheduler, "optimizer")
        and callable(getattr(type(scheduler), "step", None))
        and not hasattr(scheduler, "scheduler")
    )


def _plain(v: Any) -> Any:
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    if callable(v):
        # A function or callable object (LambdaLR's lr_lambdas): its repr holds its address,
        # which the copy's deep-copied object does not share; checks/scheduler.py compares
        # what it computes with (code, closure, globals) and the state check its attributes.
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


def _state(scheduler: Any) -> dict[str, Any]:
    """The scheduler's state as torch saves it, flattened to comparable values."""
    try:
        state = scheduler.state_dict()
    except Exception:  # a state_dict that fails: its attributes
        state = {k: v for k, v in vars(scheduler).items() if k != "optimizer"}
    out: dict[str, Any] = {}
    _flat("", state, out, 0)
    return out


def _flat(prefix: str, v: Any, out: dict[str, Any], depth: int) -> None:
    if isinstance(v, dict) and depth < MAX_DEPTH:
        for k, x in v.items():
            if k in UNREPLAYED:  # a chained scheduler's own, too
                continue
            _flat(f"{prefix}.{k}" if prefix else str(k), x, out, depth + 1)
        return
    if isinstance(v, (list, tuple)) and depth < MAX_DEPTH:
        out[f"{prefix}#len"] = len(v)
        for i, x in enumerate(v):
            _flat(f"{prefix}[{i}]", x, out, depth + 1)
        return
    out[prefix] = _canon(v, depth)


def _canon(v: Any, depth: int) -> Any:
    """One value to compare: numbers exactly (NaN equal to NaN), tensors by element,
    functions by what they are (their code is checks/scheduler.py's), an object by its
    type and attributes."""
    if v is None or isinstance(v, (bool, int, str, bytes)):
        return v
    if isinstance(v, float):
        return ("float", v.hex())
    if hasattr(v, "detach") and hasattr(v, "numel"):
        t = v.detach()
        values = t.reshape(-1)[:4096].tolist() if t.device.type != "meta" else []
        return ("tensor", str(t.dtype), tuple(t.shape), tuple([_canon(x, depth) for x in values]))
    if isinstance(v, (types.FunctionType, types.MethodType, functools.partial, type)) or (
        callable(v) and not hasattr(v, "__dict__")
    ):
        func = getattr(v, "__func__", getattr(v, "func", v))
        return ("callable", getattr(func, "__qualname__", type(func).__qualname__))
    if depth >= MAX_DEPTH:  # deeper than torch's own states nest: its type and size
        return (
            "deep",
            type(v).__qualname__,
            len(v) if isinstance(v, (list, tuple, dict)) else None,
        )
    attrs = getattr(v, "__dict__", None)
    if isinstance(attrs, dict):
        inner: dict[str, Any] = {}
        _flat("", attrs, inner, depth + 1)
        return ("object", type(v).__qualname__, tuple(sorted(inner.items(), key=lambda kv: kv[0])))
    return ("value", type(v).__qualname__, repr(v) if isinstance(v, (complex, range)) else None)


def _shown(v: Any) -> str:
    if isinstance(v, tuple) and len(v) == 2 and v[0] == "float":
        return repr(float.fromhex(v[1]))
    return repr(v) if not isinstance(v, tuple) else f"<{v[0]}>"
