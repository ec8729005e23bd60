"""Tensor rebuilds that carry state which acts after loading.

torch's allowlisted rebuild functions take more than data: a Parameter is
rebuilt with its backward hooks (``_rebuild_parameter(data, requires_grad,
backward_hooks)``, ``_rebuild_tensor_v2(..., requires_grad, backward_hooks)``)
and ``_rebuild_parameter_with_state``/``_rebuild_from_type_v2`` set attributes
from a state.  ``torch.save`` writes an empty ``OrderedDict()`` for the hooks;
a non-empty one runs the attacker's function on every backward pass (the
incident's negated gradients), delivered by nothing but allowlisted globals.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from trainguard.scanner.picklevm.machine import (
    Built,
    Call,
    DictV,
    Global,
    PickleEvents,
    Value,
    describe,
)

TENSOR_BUILDERS = frozenset(
    [
        "torch._utils._rebuild_tensor",
        "torch._utils._rebuild_tensor_v2",
        "torch._utils._rebuild_tensor_v3",
        "torch._utils._rebuild_parameter",
        "torch._utils._rebuild_parameter_with_state",
        "torch._tensor._rebuild_from_type_v2",
        # Tensor.__setstate__ takes (storage, offset, size, stride) or a state that
        # sets requires_grad and _backward_hooks: a BUILD on these writes both.
        "torch.Tensor",
        "torch.nn.parameter.Parameter",
        "torch.nn.parameter.Buffer",
    ]
)

# Argument positions: (backward hooks, state) per rebuild function.
_HOOKS_AT = {
    "torch._utils._rebuild_tensor_v2": 5,
    "torch._utils._rebuild_tensor_v3": 5,
    "torch._utils._rebuild_parameter": 2,
    "torch._utils._rebuild_parameter_with_state": 2,
}
_STATE_AT = {
    "torch._utils._rebuild_parameter_with_state": 3,
    "torch._tensor._rebuild_from_type_v2": 3,
}
_EMPTY_MAPPINGS = frozenset(["collections.OrderedDict", "builtins.dict"])


@dataclass(frozen=True)
class StateIssue:
    offset: int
    what: str  # "hooks" | "state"
    detail: str
    acts_later: bool  # hooks, or attributes named like torch internals


def is_tensor(v: object) -> bool:
    while isinstance(v, Built):
        v = v.obj
    return isinstance(v, Call) and isinstance(v.func, Global) and v.func.qualname in TENSOR_BUILDERS


def state_issues(ev: PickleEvents) -> Iterator[StateIssue]:
    """Rebuild calls whose hooks or state are not empty."""
    filled = {
        id(c.args[0])
        for c in ev.calls
        if c.kind in ("setitem", "append", "additems") and isinstance(c.args, tuple) and c.args
    }
    filled |= {id(b.obj) for b in ev.builds}
    for call in ev.calls:
        if not isinstance(call.func, Global) or not isinstance(call.args, tuple):
            continue
        name = call.func.qualname
        at = _HOOKS_AT.get(name)
        if at is not None and len(call.args) > at and not _empty(call.args[at], filled):
            yield StateIssue(call.offset, "hooks", describe(call.args[at]), True)
        at = _STATE_AT.get(name)
        if at is not None and len(call.args) > at and not _empty_state(call.args[at], filled):
            keys = _keys(call.args[at])
            internal = any(k.startswith("_") or "hook" in k.lower() for k in keys) or not keys
            yield StateIssue(call.offset, "state", describe(call.args[at]), internal)


def _empty(v: Value, filled: set[int]) -> bool:
    if v is None:
        return True
    if isinstance(v, DictV):
        return not v.items and not v.dropped and id(v) not in filled
    if isinstance(v, Call) and isinstance(v.func, Global) and v.func.qualname in _EMPTY_MAPPINGS:
        return v.args == () and id(v) not in filled
    return False


def _empty_state(v: Value, filled: set[int]) -> bool:
    if isinstance(v, tuple):
        return all(_empty(x, filled) for x in v)
    return _empty(v, filled)


def _keys(v: Value) -> list[str]:
    out: list[str] = []
    parts = v if isinstance(v, tuple) else (v,)
    for p in parts:
        if isinstance(p, DictV):
            out += [k for k, _ in p.items if isinstance(k, str)]
    return out
