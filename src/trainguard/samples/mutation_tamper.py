"""Generated Sleepy-Pickle mutants: weights changed in place while a checkpoint loads.

No command runs: an in-place tensor operation, reached under many names
(``Tensor.mul_``, ``torch.neg_``, ``torch.nn.init.zeros_``, ``Tensor.__setitem__``)
and through the access and call paths of :mod:`mutations`, edits the weight
after torch rebuilt it.  The ``torch-check-weights`` loader writes the canary
when the loaded weight differs from the intended one, so "fires" means "the
weights really changed".
"""

from __future__ import annotations

import random
from pathlib import Path

from trainguard.samples.assembler import PickleAsm
from trainguard.samples.base import Sample
from trainguard.samples.mutations import Target, emit_access
from trainguard.samples.torchfmt import contiguous_stride, emit_tensor, float_bytes
from trainguard.samples.zipwriter import torch_members, write_zip

_WEIGHTS = (0.5, -1.0, 2.0, 0.25)
_SLOT = 200  # memo slot of the weight tensor

# (module, dotted name, arguments after the tensor)
MUTATORS: dict[str, tuple[str, str, tuple[float | int, ...]]] = {
    "Tensor.mul_": ("torch", "Tensor.mul_", (2.0,)),
    "Tensor.add_": ("torch", "Tensor.add_", (1.0,)),
    "Tensor.neg_": ("torch", "Tensor.neg_", ()),
    "Tensor.fill_": ("torch", "Tensor.fill_", (3.0,)),
    "Tensor.__setitem__": ("torch", "Tensor.__setitem__", (0, 9.0)),
    "torch.neg_": ("torch", "neg_", ()),
    "torch.zero_": ("torch", "zero_", ()),
    "init.zeros_": ("torch.nn.init", "zeros_", ()),
    "init.constant_": ("torch.nn.init", "constant_", (5.0,)),
}
# Dotted names need protocol 4+ (find_class walks them only then); these paths
# can reach a dotted attribute.
ACCESS = ("global", "stack_global", "stack_global_memo", "string_names", "locate", "attrgetter")
CALLS = ("reduce", "obj", "partial_build", "copy_reconstruct")


def _items(a: PickleAsm, extra: tuple[float | int, ...]) -> None:
    a.binget(_SLOT)
    for value in extra:
        a.push(value)


def payload(mutator: str, access: str, call: str, protocol: int, canary: Path) -> bytes:
    module, name, extra = MUTATORS[mutator]
    target = Target(module, name, lambda f, c: ())
    a = PickleAsm(protocol).proto(protocol).empty_dict()
    a.str_("state_dict").global_("collections", "OrderedDict").empty_tuple().reduce()
    a.str_("weight")
    emit_tensor(a, "0", (len(_WEIGHTS),)).binput(_SLOT)
    a.setitem().setitem()
    a.str_("intended").push(list(_WEIGHTS)).setitem()
    a.str_("canary").str_(str(canary)).setitem()
    memo = [1]
    if call == "reduce":
        emit_access(a, target, access, memo)
        a.mark()
        _items(a, extra)
        a.tuple_().reduce()
    elif call == "obj":
        a.mark()
        emit_access(a, target, access, memo)
        _items(a, extra)
        a.obj()
    elif call == "partial_build":
        a.global_("functools", "partial").mark().global_("builtins", "print").tuple_().newobj()
        a.mark()
        emit_access(a, target, access, memo)
        a.mark()
        _items(a, extra)
        a.tuple_().none().none().tuple_().build()
        a.mark().tuple_().reduce()
    else:  # copy_reconstruct
        a.global_("copy", "_reconstruct").mark().none().none()
        emit_access(a, target, access, memo)
        a.mark()
        _items(a, extra)
        a.tuple_().tuple_().reduce()
    a.pop()  # the call's result is dropped: only its side effect matters
    return a.stop().getvalue()


def tamper_mutant(mutator: str, access: str, call: str, protocol: int) -> Sample:
    def build(folder: Path, canary: Path) -> Path:
        data = payload(mutator, access, call, protocol, canary)
        members = torch_members(data, {"0": float_bytes(_WEIGHTS)})
        return write_zip(folder / "sleepy.pt", members)

    ident = f"tamper-{mutator}-{access}-{call}-p{protocol}"
    return Sample(
        ident,
        ident,
        "generated Sleepy Pickle mutant",
        "",
        "torch-check-weights",
        True,
        True,
        "high",
        ("torch",),
        build,
    )


def draw_tamper(rng: random.Random) -> Sample:
    return tamper_mutant(
        rng.choice(sorted(MUTATORS)), rng.choice(ACCESS), rng.choice(CALLS), rng.choice((4, 5))
    )


# -- backward hooks delivered by allowlisted rebuild functions ------------------------
# A Parameter rebuilt with a non-empty backward_hooks dict runs the hook on every
# backward pass: torch.neg negates the gradient (the incident's flipped updates).
HOOKS: dict[str, tuple[str, str]] = {
    "torch.neg": ("torch", "neg"),
    "Tensor.neg": ("torch", "Tensor.neg"),
    "torch.zeros_like": ("torch", "zeros_like"),
    "torch.exp": ("torch", "exp"),
}
REBUILDS = ("_rebuild_parameter", "_rebuild_parameter_with_state", "_rebuild_tensor_v2")
HOOK_DICTS = ("setitem", "items-arg", "dict")


def _hook_dict(a: PickleAsm, hook: str, shape: str) -> None:
    module, name = HOOKS[hook]
    if shape == "setitem":  # OrderedDict() then SETITEM 0 -> hook
        a.global_("collections", "OrderedDict").empty_tuple().reduce()
        a.push(0).global_(module, name).setitem()
    elif shape == "items-arg":  # OrderedDict([(0, hook)])
        a.global_("collections", "OrderedDict").mark().mark().mark().push(0)
        a.global_(module, name).tuple_().list_().tuple_().reduce()
    else:  # a plain dict {0: hook}
        a.mark().push(0).global_(module, name).dict_()


def hook_payload(hook: str, rebuild: str, shape: str, canary: Path) -> bytes:
    n = len(_WEIGHTS)
    a = PickleAsm(4).proto(4).empty_dict()
    a.str_("canary").str_(str(canary)).setitem()
    a.str_("param")
    a.global_("torch._utils", rebuild).mark()
    if rebuild == "_rebuild_tensor_v2":
        a.mark().str_("storage").global_("torch", "FloatStorage").str_("0").str_("cpu").push(n)
        a.tuple_().binpersid()
        a.push(0).push((n,)).push(contiguous_stride((n,))).push(True)
        _hook_dict(a, hook, shape)
    else:
        emit_tensor(a, "0", (n,)).push(True)
        _hook_dict(a, hook, shape)
        if rebuild == "_rebuild_parameter_with_state":
            a.none()
    a.tuple_().reduce().setitem()
    return a.stop().getvalue()


def hook_mutant(hook: str, rebuild: str, shape: str) -> Sample:
    def build(folder: Path, canary: Path) -> Path:
        members = torch_members(
            hook_payload(hook, rebuild, shape, canary), {"0": float_bytes(_WEIGHTS)}
        )
        return write_zip(folder / "hooked.pt", members)

    ident = f"hooks-{hook}-{rebuild}-{shape}"
    return Sample(
        ident,
        ident,
        "generated backward-hook mutant",
        "",
        "torch-check-grad",
        True,
        True,
        "high",
        ("torch",),
        build,
    )
