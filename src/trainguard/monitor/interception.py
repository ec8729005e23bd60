"""Interception below Python names: the state torch consults on every op, read cheaply.

None of these is an attribute, so the surface and route checks cannot see them (red
team #3-#6):

* the torch-function and dispatch mode stacks (a ``TorchDispatchMode`` entered and
  never left rewrites any op's output, ``threshold_backward`` during backward
  included), and the "infra" dispatch modes set by key;
* the saved-tensor default hooks (``saved_tensors_hooks(pack, unpack)`` left open:
  every activation autograd saves goes through them);
* the Python dispatcher switch (it runs ``OpOverload.py_impl`` kernels);
* Python kernels registered through ``torch.library`` (``Library("aten", "IMPL")``):
  torch records each in ``torch.library._impls``, a set read by its size at every hook;
  and the dispatcher's own view of every operator (``torch._C._dispatch_dump``, which
  names where each kernel was registered), digested at start and swept in slices,
  which also sees a registration made through ``torch._C`` directly.

At the optimizer step's hooks honest code holds none of these: autocast is not a mode,
activation checkpointing pushes saved-tensor hooks only inside its own forward, DDP and
FSDP2 dispatch through tensor subclasses, not modes, and torch.compile leaves nothing
active between steps.  A mode or hook that is torch's own (its class from a torch module,
its functions compiled by torch: ``torch.device(...)`` as a context, ``save_on_cpu``)
is named at medium; anything else at critical.
"""

from __future__ import annotations

import hashlib
import types
from typing import Any

from trainguard.monitor import provenance

MAX_NAMED = 5


def _torch() -> Any:
    import torch

    return torch


def modes() -> tuple[Any, ...]:
    """The objects on the mode stacks and in the infra-mode slots, and the saved-tensor
    default hooks on top, in a fixed order (None where a slot is empty)."""
    torch = _torch()
    c = torch._C
    found: list[Any] = ["function"]
    found += [c._get_function_stack_at(i) for i in range(c._len_torch_function_stack())]
    found.append("dispatch")
    found += [c._get_dispatch_stack_at(i) for i in range(c._len_torch_dispatch_stack())]
    found.append("infra")
    found += [c._get_dispatch_mode(k) for k in _infra_keys(c)]
    found.append("saved")
    top = c._autograd._top_saved_tensors_default_hooks(False)
    found += list(top) if top is not None else [None]
    enabled = getattr(c, "_is_python_dispatcher_enabled", None)
    found.append(("python dispatcher", bool(enabled())) if enabled is not None else None)
    return tuple(found)


def _infra_keys(c: Any) -> list[Any]:
    keys = getattr(c, "_TorchDispatchModeKey", None)
    return list(getattr(keys, "__members__", {}).values()) if keys is not None else []


def library_size() -> int:
    """How many Python kernels ``torch.library`` has registered (it only ever grows)."""
    impls = getattr(_torch().library, "_impls", None)
    return len(impls) if impls is not None else 0


def library_entries() -> frozenset[str]:
    impls = getattr(_torch().library, "_impls", None)
    return frozenset(impls) if impls is not None else frozenset()


def op_names() -> list[str]:
    return sorted(_torch()._C._dispatch_get_all_op_names())


def op_digest(name: str) -> str:
    """A digest of the dispatcher's table for one operator (every kernel and where it
    was registered); "" for an operator that no longer exists."""
    try:
        dump = _torch()._C._dispatch_dump(name)
    except Exception:
        return ""
    return hashlib.blake2b(str(dump).encode(), digest_size=8).hexdigest()


def describe(obj: Any) -> str:
    if isinstance(obj, types.FunctionType):
        return f"{obj.__module__}.{obj.__qualname__}"
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def torch_own(obj: Any) -> bool:
    """A mode or hook of torch's own making: a function torch compiled whose closure
    holds only torch-made functions or data, or an instance of a torch class whose
    instance attributes hold no function from elsewhere."""
    owns = provenance.torch_code().owns
    if isinstance(obj, types.FunctionType):
        if not owns(obj):
            return False
        return all(torch_own(v) for v in provenance.cell_values(obj) if callable(v))
    if isinstance(obj, types.BuiltinFunctionType):
        return True
    if not type(obj).__module__.startswith("torch"):
        return False
    held = getattr(obj, "__dict__", {})
    return all(torch_own(v) for v in list(held.values()) if isinstance(v, types.FunctionType))


def differences(before: tuple[Any, ...], now: tuple[Any, ...]) -> list[Any]:
    """The objects on the stacks now that were not there before (by identity)."""
    old = {id(o) for o in before}
    return [o for o in now if id(o) not in old and o is not None and not isinstance(o, str)]
