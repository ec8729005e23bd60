"""Code identity: did someone patch the training machinery at run time?

At the start of a run we record, for each function that the incident's
attacker patched or could patch (optimizer.step, clip_grad_norm_, the seeding
functions, the data loader's iteration) the function object and a digest of
its code, and the contents of torch's global hook registries.  Each step the
same snapshot is taken again; any difference is a finding naming the function.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any


def _unwrap(fn: Any) -> Any:
    seen = 0
    while seen < 16:
        inner = getattr(fn, "__func__", None) or getattr(fn, "__wrapped__", None)
        if inner is None or inner is fn:
            break
        fn = inner
        seen += 1
    return fn


def code_digest(fn: Any) -> str:
    """Identity of a callable: its object id, and a digest of its code and constants."""
    if fn is None:
        return "missing"
    outer = fn
    fn = _unwrap(fn)
    code = getattr(fn, "__code__", None)
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{type(outer).__qualname__}:{id(fn)}".encode())
    if code is not None:
        h.update(code.co_code)
        h.update(repr(code.co_consts).encode())
        h.update(repr(code.co_names).encode())
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                h.update(
                    f"{type(cell.cell_contents).__qualname__}:{id(cell.cell_contents)}".encode()
                )
            except ValueError:  # empty cell
                h.update(b"<empty>")
    return h.hexdigest()


def _registry(obj: Any) -> str:
    """A hook registry's size and the identity of every hook in it."""
    if obj is None:
        return "missing"
    values = list(obj.values()) if hasattr(obj, "values") else list(obj)
    return f"{len(values)}:" + ",".join(code_digest(v) for v in values)


def probes(optimizer: Any, dataloader: Any = None) -> dict[str, Callable[[], str]]:
    """Name -> function giving the current identity of that piece of machinery."""
    import torch
    import torch.nn.modules.module as module_mod
    import torch.optim.optimizer as optim_mod

    found: dict[str, Callable[[], str]] = {
        "optimizer.step": lambda: code_digest(getattr(optimizer, "step", None)),
        f"{type(optimizer).__name__}.step (class)": lambda: code_digest(
            type(optimizer).__dict__.get("step")
        ),
        "torch.optim.Optimizer.zero_grad": lambda: code_digest(torch.optim.Optimizer.zero_grad),
        "torch.nn.utils.clip_grad_norm_": lambda: code_digest(torch.nn.utils.clip_grad_norm_),
        "torch.nn.utils.clip_grad.clip_grad_norm_": lambda: code_digest(
            torch.nn.utils.clip_grad.clip_grad_norm_
        ),
        "torch.nn.utils.clip_grad_value_": lambda: code_digest(torch.nn.utils.clip_grad_value_),
        "torch.manual_seed": lambda: code_digest(torch.manual_seed),
        "torch.random.manual_seed": lambda: code_digest(torch.random.manual_seed),
        "torch.Tensor.backward": lambda: code_digest(torch.Tensor.backward),
        "torch.autograd.backward": lambda: code_digest(torch.autograd.backward),
        "optimizer hooks (global pre)": lambda: _registry(
            getattr(optim_mod, "_global_optimizer_pre_hooks", None)
        ),
        "optimizer hooks (global post)": lambda: _registry(
            getattr(optim_mod, "_global_optimizer_post_hooks", None)
        ),
        "optimizer hooks (instance pre)": lambda: _registry(
            getattr(optimizer, "_optimizer_step_pre_hooks", None)
        ),
        "optimizer hooks (instance post)": lambda: _registry(
            getattr(optimizer, "_optimizer_step_post_hooks", None)
        ),
    }
    for name in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    ):
        found[f"module hooks ({name})"] = _registry_probe(module_mod, name)
    if dataloader is not None:
        found["dataloader.__iter__"] = lambda: code_digest(type(dataloader).__iter__)
        import torch.utils.data.dataloader as dl

        found["_BaseDataLoaderIter.__next__"] = lambda: code_digest(dl._BaseDataLoaderIter.__next__)
        found["dataset.__getitem__"] = lambda: code_digest(
            getattr(type(dataloader.dataset), "__getitem__", None)
        )
        found["sampler.__iter__"] = lambda: code_digest(
            getattr(type(dataloader.sampler), "__iter__", None)
        )
    return found


def _registry_probe(module: Any, name: str) -> Callable[[], str]:
    return lambda: _registry(getattr(module, name, None))


def snapshot(current: dict[str, Callable[[], str]]) -> dict[str, str]:
    return {name: probe() for name, probe in current.items()}


def differences(before: dict[str, str], now: dict[str, str]) -> list[str]:
    return [name for name in before if now.get(name) != before[name]]
