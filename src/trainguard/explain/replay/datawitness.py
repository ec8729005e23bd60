"""The state a checkpoint restores that only the entry's own objects hold (issue #13, red
team s5 family 4): the ``data_state`` the loop saved, and the optimizer's state at the
run's start.

Replay restores ``ctx.data_state`` through the entry, so a private generator carried in
it (an augmentation's ``torch.Generator``, as docs/replay.md advises saving) was taken on
the checkpoint's word: re-seeded before ``watch()`` or between a segment's last step and
its save, every step after it replayed "clean" from the checkpoint.  The invariant is the
one the rest of the carried state is held to: the data state a checkpoint restores must
be the one recomputing the segment before ends in, and at the run's start the one the
entry's fresh build holds.  Replay reads it

- from ``Replayable.data_state`` (a callable giving the data state as the loop passes it
  to ``guard.checkpoint``): all of it is held; or, where the entry declares none,
- from the ``torch.Generator`` objects the entry restored the checkpoint's generator
  states into (found from ``step`` by state, right after the entry built): those entries
  of ``data_state`` are held, the rest (an epoch number) cannot be recomputed.

At the run's first checkpoint the witness is a second build from the run's start with no
checkpoint (``ctx.data_state`` None, as where a run has no checkpoint at step 0).

The optimizer's state at the first checkpoint is held to the fresh build's like the
weights are: a fresh optimizer has none, and a run resumed from an earlier run's
checkpoint is one whose entry loads that checkpoint at its start (weights too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from trainguard.explain.replay.entry import Replayable, ReplayContext, as_replayable
from trainguard.explain.replay.ledger import ReplayError
from trainguard.monitor import carried
from trainguard.monitor import checkpoint as ckpt

Locator = tuple[tuple[str, Any], ...]  # how to reach an object from the entry's ``step``
MAX_DEPTH = 5  # closure of a closure of a bound method's instance attribute...
MAX_NODES = 4000  # objects looked at per search: a model's attributes are many
PART = "data generators"  # the entries of data_state that generators of the entry hold


def _children(obj: Any) -> Iterator[tuple[tuple[str, Any], Any]]:
    """What a search goes through from ``obj``: functions' closures, bound methods, partials,
    instances' attributes and containers' items (not tensors, modules' code, classes)."""
    import functools
    import types

    if isinstance(obj, (types.FunctionType, types.LambdaType)):
        for i, cell in enumerate(obj.__closure__ or ()):
            try:
                yield ("cell", i), cell.cell_contents
            except ValueError:  # an empty cell
                continue
    elif isinstance(obj, types.MethodType):
        yield ("self", None), obj.__self__
        yield ("func", None), obj.__func__
    elif isinstance(obj, functools.partial):
        yield ("func", None), obj.func
        for i, arg in enumerate(obj.args):
            yield ("item", i), arg
    elif isinstance(obj, Mapping):
        for k, v in list(obj.items())[:MAX_NODES]:
            if isinstance(k, (str, int)):
                yield ("item", k), v
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj[:MAX_NODES]):
            yield ("item", i), v
    elif not isinstance(obj, (type, types.ModuleType, str, bytes, int, float)):
        attrs = getattr(obj, "__dict__", None)
        if isinstance(attrs, dict):
            for k, v in list(attrs.items())[:MAX_NODES]:
                if isinstance(k, str):
                    yield ("attr", k), v


def generators(root: Any) -> list[tuple[Locator, Any]]:
    """The ``torch.Generator`` objects reachable from ``root``, breadth first, with how."""
    import torch

    found: list[tuple[Locator, Any]] = []
    seen: set[int] = set()
    level: list[tuple[Locator, Any]] = [((), root)]
    nodes = 0
    for _ in range(MAX_DEPTH + 1):
        below: list[tuple[Locator, Any]] = []
        for where, obj in level:
            if id(obj) in seen or nodes >= MAX_NODES:
                continue
            seen.add(id(obj))
            nodes += 1
            if isinstance(obj, torch.Generator):
                found.append((where, obj))
            elif not isinstance(obj, torch.Tensor):
                below += [((*where, step), child) for step, child in _children(obj)]
        level = below
    return found


def follow(root: Any, where: Locator) -> Any:
    """The object ``where`` reaches from ``root`` (None where it does not)."""
    obj = root
    for kind, key in where:
        step = dict(_children(obj)).get((kind, key), _MISSING)
        if step is _MISSING:
            return None
        obj = step
    return obj


_MISSING = object()


def bind(run: Replayable, data_state: Any) -> dict[str, Locator]:
    """For each entry of ``data_state`` that is a torch CPU generator's state, where the
    entry's ``step`` reaches a generator holding exactly that state (the entry restored it
    there); named as :func:`carried.flatten` names the entry (``data state aug``)."""
    import torch

    if not isinstance(data_state, Mapping):
        return {}
    wanted = {
        str(k): v
        for k, v in data_state.items()
        if isinstance(v, torch.Tensor)
        and v.dtype == torch.uint8
        and v.numel() == carried.TORCH_CPU_STATE_BYTES
    }
    if not wanted:
        return {}
    found = [(w, g, g.get_state()) for w, g in generators(run.step) if g.device.type == "cpu"]
    out = {}
    for key, state in wanted.items():
        matches = [(w, g) for w, g, s in found if torch.equal(s, state)]
        # Two generators holding that state (seeded alike): which one the entry restored
        # and steps with is not known, so neither is held (no false alarm on a guess).
        if len({id(g) for _, g in matches}) == 1:
            out[f"data state {key}"] = matches[0][0]
    return out


def expected(run: Replayable, binding: Mapping[str, Locator]) -> dict[str, dict[str, str]]:
    """The data state ``run``'s objects are in now, as carried parts: ``data`` (all of it,
    from ``run.data_state()``), else :data:`PART` (the bound generators' states)."""
    if callable(run.data_state):
        value = _call("the entry's data_state()", run.data_state)
        return {"data": carried.flatten(None, None, None, None, value)["data"]}
    states = {}
    for name, where in binding.items():
        g = follow(run.step, where)
        if g is not None and hasattr(g, "get_state"):
            states[name.removeprefix("data state ")] = g.get_state()
    if not states:
        return {}
    return {PART: carried.flatten(None, None, None, None, states)["data"]}


def fresh(
    entry: Callable[[ReplayContext], Any],
    ctx: ReplayContext,
    run: Replayable,
    binding: Mapping[str, Locator],
    notes: list[str],
) -> dict[str, dict[str, str]]:
    """At the run's first checkpoint: the data state a build from the run's start gives
    (the entry called again with no checkpoint, the global random states put back after).
    Where the entry declared no ``data_state`` and fails so, a note: nothing is held."""
    if ctx.data_state is None or not (callable(run.data_state) or binding):
        return {}
    start = dataclasses.replace(ctx, data_state=None, loader_state=None, checkpoint=None)
    before = ckpt.random_states()
    try:
        other = as_replayable(entry(start))
    except Exception as exc:
        if callable(run.data_state):
            raise ReplayError(
                f"the entry point built from the run's start (ctx.data_state None) raised "
                f"{type(exc).__name__}: {exc}; an entry that declares data_state must build "
                "the fresh state there (docs/replay.md)"
            ) from exc
        notes.append(
            "the first checkpoint's data_state holds generator states, and the entry built "
            f"without a checkpoint raised {type(exc).__name__}: they are not held to a fresh "
            "build (declare Replayable.data_state; docs/replay.md)"
        )
        return {}
    finally:
        ckpt.restore_random_states(before)
    return expected(other, binding)


def optimizer_part(optimizer_state: Any) -> dict[str, dict[str, str]]:
    """The optimizer's per-parameter state (moments, step counts) as a carried part, never
    empty: a fresh optimizer's is ``entries 0``."""
    state = optimizer_state.get("state") if isinstance(optimizer_state, Mapping) else None
    state = state if isinstance(state, Mapping) else {}
    part = {"optimizer state entries": f"int:{len(state)}"}
    for index, slots in state.items():
        if isinstance(slots, Mapping):
            flat = carried.flatten(None, None, None, None, {str(k): v for k, v in slots.items()})
            for name, text in flat["data"].items():
                part[f"optimizer state {index} {name.removeprefix('data state ')}"] = text
    return {"optimizer state": part}


def _call(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:
        raise ReplayError(f"{what} raised {type(exc).__name__}: {exc}") from exc
