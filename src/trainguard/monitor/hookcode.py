"""What a hook runs, and whether that is torch's distributed machinery or trainguard.

Red team 2026-12-05 (A04n, A04p): ``p.register_hook(torch.neg)`` and
``p.register_hook(functools.partial(torch.mul, other=0.1))`` planted before
``watch()`` (a checkpoint payload) flipped or shrank gradients with no alert: the
start-up audit looked at where a hook's *code file* lies, and torch's own
functions (builtins, partials of them, callable objects) lie in torch.  Where code
comes from says nothing about what it does to a gradient.

The invariant: a hook that can change gradients or the update and is present when
the guard starts is reported (high) unless what it runs is the guard's own code or
torch's data-parallel / sharding / checkpointing machinery.  What it runs is found
through the wrappers (bound methods, ``functools.partial``, ``__wrapped__``, a
callable object's class ``__call__``); each function found is judged by the module
whose namespace it runs in: its ``__globals__`` must be the very namespace of a
loaded module of those packages, and its code must come from that module's file
(``__module__`` is writable and proves nothing).  A builtin (``torch.neg``) is
never machinery.
"""

from __future__ import annotations

import functools
import os
import sys
import types
from typing import Any

MAX_TARGETS = 16  # objects followed per hook (wrappers of wrappers)
# Packages whose hooks are torch's own training machinery: DDP and its comm hooks,
# FSDP (1 and 2) and the composable APIs, activation checkpointing.
MACHINERY = ("torch.distributed.", "torch.nn.parallel.", "torch.utils.checkpoint")
OWN = ("trainguard.",)


def targets(hook: Any) -> list[Any]:
    """The functions and builtins a hook runs, through bound methods, partials,
    ``__wrapped__`` and a callable object's ``__call__``; an object whose call cannot be
    resolved is itself the target (and is then judged foreign)."""
    out: list[Any] = []
    todo = [hook]
    seen = 0
    while todo and seen < MAX_TARGETS:
        seen += 1
        obj = todo.pop()
        if isinstance(obj, types.MethodType):
            todo.append(obj.__func__)
        elif isinstance(obj, functools.partial):
            todo.append(obj.func)
        elif isinstance(obj, (staticmethod, classmethod)):
            todo.append(obj.__func__)
        elif isinstance(obj, types.FunctionType):
            out.append(obj)
            inner = obj.__dict__.get("__wrapped__")
            if inner is not None:
                todo.append(inner)
        elif isinstance(obj, (types.BuiltinFunctionType, types.MethodWrapperType)) or (
            isinstance(obj, (types.WrapperDescriptorType, types.MethodDescriptorType))
        ):
            out.append(obj)
        else:
            # A callable object: its class's code (looked up statically, as Python calls it).
            call = next(
                (vars(c)["__call__"] for c in type(obj).__mro__ if "__call__" in vars(c)), None
            )
            if isinstance(call, types.FunctionType):
                todo.append(call)
            else:
                out.append(obj)
    return out + todo  # what was left unfollowed is judged as it is


def home(fn: types.FunctionType) -> str:
    """The module whose namespace ``fn`` runs in, when it is that module's own code
    (its globals are the module's dict and its code comes from the module's file)."""
    name = fn.__globals__.get("__name__")
    module = sys.modules.get(name) if isinstance(name, str) else None
    path = getattr(module, "__file__", None)
    if module is None or vars(module) is not fn.__globals__ or not isinstance(path, str):
        return ""
    if os.path.realpath(fn.__code__.co_filename) != os.path.realpath(path):
        return ""
    return str(name)


def trusted(hook: Any) -> bool:
    """Whether everything ``hook`` runs is trainguard's or torch's distributed machinery."""
    found = targets(hook)
    return bool(found) and all(
        isinstance(f, types.FunctionType) and (home(f).startswith(MACHINERY + OWN) or _decorator(f))
        for f in found
    )


def _decorator(fn: types.FunctionType) -> bool:
    """A wrapper torch's own decorators made (``torch.no_grad()``, ``_disable_dynamo``):
    judged by what it wraps, which :func:`targets` also returns."""
    return "__wrapped__" in fn.__dict__ and home(fn).startswith("torch")


def name(hook: Any) -> str:
    """A short name of what a hook runs (``torch.neg``, ``partial(torch.mul)``)."""
    parts: list[str] = []
    for f in targets(hook):
        module = getattr(f, "__module__", None) or type(f).__module__
        qual = getattr(f, "__qualname__", None) or type(f).__qualname__
        if f"{module}.{qual}" not in parts:
            parts.append(f"{module}.{qual}")
    shown = " -> ".join(parts[:3]) or type(hook).__qualname__
    return f"partial({shown})" if isinstance(hook, functools.partial) else shown
