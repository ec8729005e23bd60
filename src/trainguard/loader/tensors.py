"""Our own rebuild functions for tensors and storages.

PyTorch checkpoints name ``torch._utils._rebuild_tensor_v2`` and friends; the
safe unpickler hands out these functions instead, which build the same
tensors from storages read by the loader and check every size, stride and
offset against the storage first (the checks whose absence let
CVE-2026-24747 corrupt memory).  Without torch installed, tensors come back
as numpy arrays.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from trainguard.errors import UnsafeModelError
from trainguard.rules import finding

# Storage class name -> (torch dtype name, numpy dtype or None, item size).
STORAGE_TYPES: dict[str, tuple[str, str | None, int]] = {
    "FloatStorage": ("float32", "<f4", 4),
    "DoubleStorage": ("float64", "<f8", 8),
    "HalfStorage": ("float16", "<f2", 2),
    "BFloat16Storage": ("bfloat16", None, 2),
    "LongStorage": ("int64", "<i8", 8),
    "IntStorage": ("int32", "<i4", 4),
    "ShortStorage": ("int16", "<i2", 2),
    "CharStorage": ("int8", "i1", 1),
    "ByteStorage": ("uint8", "u1", 1),
    "BoolStorage": ("bool", "?", 1),
    "ComplexFloatStorage": ("complex64", "<c8", 8),
    "ComplexDoubleStorage": ("complex128", "<c16", 16),
}


@dataclass(frozen=True)
class StorageType:
    """Stands in for ``torch.FloatStorage`` & co. inside persistent ids."""

    name: str

    @property
    def itemsize(self) -> int:
        return STORAGE_TYPES[self.name][2]


def refuse(rule_id: str, message: str, source: str = "", trigger: str = "") -> UnsafeModelError:
    found = finding(rule_id, message, file=source, trigger=trigger)
    return UnsafeModelError(source or "checkpoint", [found])


def torch_or_none() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def check_view(numel: int, offset: Any, size: Any, stride: Any) -> None:
    """Raise unless the strided view lies inside a storage of ``numel`` items."""
    if not (isinstance(offset, int) and isinstance(size, tuple) and isinstance(stride, tuple)):
        raise refuse("TG402", "tensor offset, size or stride is not made of integers")
    if len(size) != len(stride) or not all(
        isinstance(x, int) and x >= 0 for x in (*size, *stride, offset)
    ):
        raise refuse("TG402", f"invalid tensor geometry size={size} stride={stride}")
    if math.prod(size) == 0:
        return
    last = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
    if last >= numel:
        raise refuse(
            "TG402",
            f"tensor view (offset {offset}, size {size}, stride {stride}) reaches element "
            f"{last} of a storage of {numel}",
        )


class Storage:
    """A storage read from the checkpoint: a flat buffer of one dtype."""

    def __init__(self, kind: StorageType, data: Any, numel: int) -> None:
        self.kind = kind
        self.data = data  # torch tensor of the storage's dtype, or numpy array
        self.numel = numel


def rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any) -> Any:
    if not isinstance(storage, Storage):
        raise refuse("TG402", "a tensor's storage is not a storage from this checkpoint")
    size, stride = tuple(size), tuple(stride)
    check_view(storage.numel, offset, size, stride)
    torch = torch_or_none()
    if torch is not None and isinstance(storage.data, torch.Tensor):
        return torch.as_strided(storage.data, size, stride, offset)
    import numpy as np

    arr = storage.data
    byte_strides = tuple(s * arr.itemsize for s in stride)
    view = np.lib.stride_tricks.as_strided(arr[offset:], shape=size, strides=byte_strides)
    return view.copy()  # as_strided views are unsafe to hand out; copy is cheap next to I/O


def _no_hooks(hooks: Any) -> None:
    if hooks is not None and not (isinstance(hooks, (dict, OrderedDict)) and not hooks):
        raise refuse("TG401", "tensor carries backward hooks (callables from the file)")


def rebuild_tensor_v2(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> Any:
    _no_hooks(backward_hooks)
    t = rebuild_tensor(storage, offset, size, stride)
    if requires_grad and hasattr(t, "requires_grad_"):
        t.requires_grad_(bool(requires_grad))
    return t


def rebuild_tensor_v3(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> Any:
    return rebuild_tensor_v2(storage, offset, size, stride, requires_grad, backward_hooks)


def rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> Any:
    _no_hooks(backward_hooks)
    torch = torch_or_none()
    if torch is None:
        return data
    return torch.nn.Parameter(data, requires_grad=bool(requires_grad))


def rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> Any:
    if state:
        raise refuse("TG401", "parameter carries extra state (attributes set from the file)")
    return rebuild_parameter(data, requires_grad, backward_hooks)


def rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    allowed = {rebuild_tensor_v2, rebuild_tensor_v3, rebuild_parameter}
    if func not in allowed or not isinstance(args, tuple):
        raise refuse("TG401", "_rebuild_from_type_v2 with a function outside the allowlist")
    if state:
        raise refuse("TG401", "tensor subclass carries extra state (attributes from the file)")
    result = func(*args)
    torch = torch_or_none()
    if torch is not None and new_type is torch.nn.Parameter:
        return torch.nn.Parameter(result, requires_grad=result.requires_grad)
    if torch is not None and new_type is not torch.Tensor:
        raise refuse("TG401", f"tensor subclass {new_type!r} is outside the allowlist")
    return result
