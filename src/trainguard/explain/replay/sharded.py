"""Putting a sharded (FSDP2) checkpoint back into the model the entry built.

Under ``fully_shard`` every rank's checkpoint holds its own slice of each sharded
tensor, as a plain tensor, and where the slice sits
(:func:`trainguard.monitor.sharding.local_state`).  The entry builds the model
sharded as in training, so each of its parameters is a ``DTensor`` whose slice on
this rank must be the saved one: same offset, same shape, same whole shape.  A
slice is then wrapped back into a ``DTensor`` with the entry's own mesh and
placements, and ``load_state_dict`` restores it as it would a gathered state.

Fail closed: a checkpoint sharded otherwise than the entry's model (another world
size, another wrapping), a saved slice where the entry holds a whole tensor, or a
whole tensor where it holds a slice, is a :class:`ReplayError` naming the tensor;
nothing is re-sharded or gathered (the slices of the other ranks are in their own
files, read by their own replay processes).
"""

from __future__ import annotations

from typing import Any

from trainguard.explain.replay.ledger import ReplayError
from trainguard.monitor import checkpoint as ckpt
from trainguard.monitor import sharding

Layouts = dict[str, dict[str, list[int]]]


def restorable(run_model: Any, run_optimizer: Any, saved: ckpt.Checkpoint) -> tuple[Any, Any]:
    """The checkpoint's model and optimizer states, each saved slice back in a ``DTensor``
    of the entry's layout (the states as they are when nothing was sharded)."""
    shards = saved.shards or {}
    model_layouts: Layouts = shards.get("model") or {}
    optimizer_layouts: Layouts = shards.get("optimizer") or {}
    model = _model_state(run_model, saved.model, model_layouts)
    optimizer = _optimizer_state(run_optimizer, saved.optimizer, optimizer_layouts)
    return model, optimizer


def _model_state(model: Any, state: dict[str, Any], layouts: Layouts) -> dict[str, Any]:
    targets = model.state_dict()
    out = dict(state)
    for name, value in state.items():
        out[name] = _as_target(f"model {name}", value, layouts.get(name), targets.get(name))
    for name in layouts:
        if name not in state:
            raise ReplayError(f"the checkpoint's shard layout names model {name}, which it lacks")
    result = type(state)(out)
    if hasattr(state, "_metadata"):
        result._metadata = state._metadata  # type: ignore[attr-defined]
    return result


def _optimizer_state(optimizer: Any, state: dict[str, Any], layouts: Layouts) -> dict[str, Any]:
    per_param = state.get("state")
    if not isinstance(per_param, dict):
        if layouts:
            raise ReplayError("the checkpoint's optimizer holds shard layouts but no state")
        return state
    params = [p for g in optimizer.param_groups for p in g["params"]]
    restored: dict[Any, Any] = {}
    for index, slots in per_param.items():
        if not isinstance(slots, dict):
            restored[index] = slots
            continue
        param = params[index] if isinstance(index, int) and 0 <= index < len(params) else None
        new = dict(slots)
        for slot, value in slots.items():
            layout = layouts.get(f"state.{index}.{slot}")
            # An optimizer moment is sharded as its parameter is; a scalar (``step``)
            # or a state of another shape is not, and stays as it was saved.
            target = param if layout is not None or _local_like(value, param) else None
            new[slot] = _as_target(f"optimizer state {slot} of parameter {index}", value,
                                   layout, target)  # fmt: skip
        restored[index] = new
    known = {f"state.{i}.{s}" for i, slots in per_param.items() if isinstance(slots, dict)
             for s in slots}  # fmt: skip
    for path in layouts:
        if path not in known:
            raise ReplayError(
                f"the checkpoint's shard layout names optimizer {path}, which it lacks"
            )
    return {**state, "state": restored}


def _local_like(value: Any, param: Any) -> bool:
    """A plain tensor shaped like the slice a sharded ``param`` holds on this rank."""
    if param is None or not sharding.is_dtensor(param) or sharding.is_dtensor(value):
        return False
    _, local_shape = sharding.placement(param)
    return hasattr(value, "shape") and tuple(value.shape) == local_shape and value.dim() > 0


def _as_target(what: str, value: Any, layout: dict[str, list[int]] | None, target: Any) -> Any:
    """``value`` (saved) as the entry's ``target`` holds it: a DTensor of the target's layout
    when the target is sharded."""
    sharded = target is not None and sharding.is_dtensor(target)
    if layout is None and not sharded:
        return value
    if layout is None:
        raise ReplayError(
            f"{what}: the checkpoint holds it whole, the entry's model shards it: replay "
            "with the wrapping training used (a checkpoint saved without fully_shard?)"
        )
    if not sharded:
        raise ReplayError(
            f"{what}: the checkpoint holds one rank's slice, the entry's model holds the whole "
            "tensor: the entry must shard the model as training did (fully_shard)"
        )
    offset, local_shape = sharding.placement(target)
    saved = (tuple(layout.get("offset") or ()), tuple(getattr(value, "shape", ())),
             tuple(layout.get("shape") or ()))  # fmt: skip
    mine = (offset, local_shape, tuple(int(s) for s in target.shape))
    if saved != mine:
        raise ReplayError(
            f"{what}: the checkpoint's slice is {_describe(*saved)}, this rank of the entry "
            f"holds {_describe(*mine)}: replay with training's world size and sharding"
        )
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        value,
        target.device_mesh,
        target.placements,
        run_check=False,
        shape=target.shape,
        stride=target.stride(),
    )


def _describe(offset: tuple[int, ...], local: tuple[int, ...], whole: tuple[int, ...]) -> str:
    return f"{sharding.label('', offset, local, whole) or 'all'} of shape {list(whole)}"
