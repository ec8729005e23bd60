"""Sharded tensors (FSDP2 / DTensor, ZeRO): what this rank holds, and where it sits.

Under FSDP2 (``fully_shard``) every parameter and optimizer moment is a
``DTensor`` whose global shape is the whole tensor while this rank holds one
slice of it, possibly empty, possibly of a size no 64-bit view divides.  Every
check reads the *local* slice (never a gathered copy: gathering the weights
would cost the memory that sharding saves) and names it by the parameter and
the slice it covers, ``"0.weight[4:8]"``.  Two ranks that hold the same label
must hold the same bytes (replicas: DDP, the replica groups of HSDP, the
parameters of ZeRO); a label held by one rank only (a pure shard) has nothing
to be compared with, and the composed model is checked instead (see
distributed.py).

The label is the invariant, not the wrapper: nothing here asks which
framework sharded the tensor, only which global elements this rank holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Shard:
    """One rank's slice of a (possibly) distributed tensor."""

    name: str
    label: str  # the name, plus the slice when the tensor is sharded
    local: Any  # the local tensor (a plain torch.Tensor)
    offset: tuple[int, ...]
    global_shape: tuple[int, ...]

    @property
    def sharded(self) -> bool:
        return self.label != self.name


def is_dtensor(t: Any) -> bool:
    return callable(getattr(t, "to_local", None)) and hasattr(t, "placements")


def local(t: Any) -> Any:
    """The tensor this rank holds: a DTensor's local slice, anything else unchanged."""
    if is_dtensor(t):
        return t.to_local()
    return t


def placement(t: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global offset, local shape) of ``t`` on this rank; zeros and its shape for a plain one."""
    if not is_dtensor(t):
        return (0,) * t.dim(), tuple(t.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple([int(o) for o in offset]), tuple([int(s) for s in shape])


def label(
    name: str, offset: tuple[int, ...], local_shape: tuple[int, ...], shape: tuple[int, ...]
) -> str:
    """``name`` alone when this rank holds the whole tensor, else ``name[a:b,...]``.

    Dimensions held whole print as ``:`` and trailing ones are left out, so
    FSDP's row shards read ``0.weight[4:8]``; an empty shard reads ``[3:3]``.
    """
    dims = []
    for o, s, g in zip(offset, local_shape, shape, strict=True):
        dims.append(":" if (o == 0 and s == g) else f"{o}:{o + s}")
    while dims and dims[-1] == ":":
        dims.pop()
    return f"{name}[{','.join(dims)}]" if dims else name


def shard(name: str, t: Any) -> Shard:
    offset, local_shape = placement(t)
    shape = tuple([int(s) for s in t.shape])
    return Shard(name, label(name, offset, local_shape, shape), local(t), offset, shape)


def shards(named: Iterable[tuple[str, Any]]) -> list[Shard]:
    return [shard(n, t) for n, t in named if t is not None]


def any_sharded(named: Iterable[tuple[str, Any]]) -> bool:
    """Whether some tensor is split over ranks (its label carries a slice)."""
    return any(s.sharded for s in shards(named))


def state_owner(optimizer: Any) -> Any:
    """The object whose ``.state`` holds this rank's optimizer state.

    ``ZeroRedundancyOptimizer`` keeps the state of the parameters this rank owns
    in its wrapped ``.optim``; its own ``.state`` stays empty.
    """
    if type(optimizer).__name__ == "ZeroRedundancyOptimizer" and hasattr(optimizer, "optim"):
        return optimizer.optim
    return optimizer


MAX_WRAPPERS = 8  # optimizer wrappers unwrapped at most (a loop of .optimizer ends here)


def stepped_optimizer(optimizer: Any) -> Any:
    """The ``torch.optim.Optimizer`` inside framework wrappers, whose step hooks fire.

    Accelerate's ``AcceleratedOptimizer`` (what ``accelerator.prepare`` returns, and
    what the Hugging Face Trainer holds) subclasses ``Optimizer`` without calling its
    ``__init__``: it has no hook registry, and its ``step`` calls the wrapped
    optimizer's, whose hooks do fire.  A wrapper is recognised by that: no
    ``_optimizer_step_pre_hooks`` of its own and an ``.optimizer`` attribute.  An
    object that never leads to a hookable optimizer is returned as it is, and
    registering the hooks then fails loudly.
    """
    found = optimizer
    for _ in range(MAX_WRAPPERS):
        if hasattr(found, "_optimizer_step_pre_hooks") or not hasattr(found, "optimizer"):
            return found
        found = found.optimizer
    return optimizer


# -- checkpoints: each rank saves its own shard ---------------------------------------


def layout_of(t: Any) -> dict[str, list[int]]:
    """Where a shard sits: its global offset and the whole tensor's shape (plain lists, so
    that ``trainguard.load`` reads them back)."""
    offset, _ = placement(t)
    return {"offset": list(offset), "shape": [int(s) for s in t.shape]}


def local_state(state: Any, prefix: str = "") -> tuple[Any, dict[str, dict[str, list[int]]]]:
    """``state`` (a state dict, nested) with every DTensor replaced by this rank's slice,
    and the layout of each replaced one by its dotted path.

    A DTensor pickles its device mesh and process group, which no allowlist loader
    should rebuild, and gathering the whole tensor would cost the memory sharding saves:
    a rank's checkpoint holds its own slice, as plain tensors, and where each slice sits,
    so that a replay can put it back into a model sharded the same way (and tell one
    sharded otherwise).
    """
    layouts: dict[str, dict[str, list[int]]] = {}
    if is_dtensor(state):
        layouts[prefix] = layout_of(state)
        return state.to_local(), layouts
    if isinstance(state, dict):
        items: dict[Any, Any] = {}
        for k, v in state.items():
            items[k], inner = local_state(v, f"{prefix}.{k}" if prefix else str(k))
            layouts.update(inner)
        if not layouts:
            return state, layouts
        out = type(state)(items)
        if hasattr(state, "_metadata"):  # a module's state dict: versions load_state_dict reads
            out._metadata = state._metadata  # type: ignore[attr-defined]
        return out, layouts
    if isinstance(state, (list, tuple)) and any(is_dtensor(v) for v in state):
        pairs = [local_state(v, f"{prefix}[{i}]") for i, v in enumerate(state)]
        for _, inner in pairs:
            layouts.update(inner)
        return type(state)(v for v, _ in pairs), layouts
    return state, layouts
