"""What ``torch.compile`` itself changes in torch's namespaces, told from a patch.

Compiling ``optimizer.step`` (PyTorch's compiled-optimizer recipe) changes the
very namespaces the identity check watches, by torch's own hand:

* at the first compilation, dynamo wraps each optimizer class's ``_init_group``
  and each ``_fused_<name>`` function in its ``disable`` wrapper
  (``TorchPatcher.patch``), also where the class only inherited it (``AdamW``
  gets its own attribute, wrapping ``Adam``'s function: compiling only the model
  after ``watch()`` was TG1304 critical at step 0);
* the transformed bytecode of a compiled frame looks its helpers up in the
  frame's module globals, so dynamo adds ``__compiled_fn_*``, ``__resume_at_*``,
  ``__import_<module>``, ``__builtins_dict___<n>`` and weak references there.

Neither is a list of names trusted on sight.  A wrapper is torch's when its code
object *is* the code of dynamo's own disable wrapper (compared by identity with
one made at start-up) and its closure holds exactly the object it replaced.  A
new global is inert until bytecode names it, and bytecode made before it existed
cannot: a new name is accepted when it has dynamo's prefix and a value of the
kind dynamo puts there (``__import_a_dot_b`` must be ``sys.modules["a.b"]``).
Once accepted, the namespace's baseline includes it, so any later change of it
is reported like any other.
"""

from __future__ import annotations

import builtins
import sys
import types
import weakref
from typing import Any

from trainguard.monitor import provenance

_PREFIXES = ("__compiled_fn_", "__resume_at_", "__import_", "__builtins_dict___", "__optimizer_")
_wrapper_code: Any = None


def _disable_code() -> Any:
    """The code object of dynamo's disable wrapper (None when dynamo is unavailable)."""
    global _wrapper_code
    if _wrapper_code is None:
        try:
            import torch

            disable: Any = torch.compiler.disable  # untyped in torch
            _wrapper_code = disable(lambda: None).__code__
        except Exception:  # no dynamo in this build: nothing of it can be trusted
            _wrapper_code = False
    return _wrapper_code or None


def _dynamo_wrapper(value: Any) -> bool:
    code = _disable_code()
    return isinstance(value, types.FunctionType) and code is not None and value.__code__ is code


def _wraps(new: Any, old: Any) -> bool:
    """``new`` is dynamo's disable wrapper around exactly ``old``."""
    if not _dynamo_wrapper(new) or old is None:
        return False
    cells = provenance.cell_values(new)
    inner = old.__func__ if isinstance(old, (staticmethod, classmethod)) else old
    return any(c is inner for c in cells) and len(cells) == 2


def _wraps_inherited(ns: Any, key: str, value: Any) -> bool:
    """A class attribute ``key`` new on ``ns`` is dynamo's disable wrapper around what
    the class inherited: the base's function, or what the base's own wrapper (put there by
    the same compilation) wraps."""
    if not isinstance(ns, type):
        return False
    for base in ns.__mro__[1:]:
        if key in vars(base):
            inherited = vars(base)[key]
            if _dynamo_wrapper(inherited):
                cells = provenance.cell_values(inherited)
                inner = [c for c in cells if isinstance(c, types.FunctionType)]
                return len(inner) == 1 and _wraps(value, inner[0])
            return _wraps(value, inherited)
    return False


def dynamo_global(key: str, value: Any) -> bool:
    if not key.startswith(_PREFIXES):
        return False
    if key.startswith("__import_"):
        name = key.removeprefix("__import_").replace("_dot_", ".")
        return sys.modules.get(name) is value
    if key.startswith("__builtins_dict___"):
        return value is builtins.__dict__
    if key.startswith("__optimizer_"):
        return isinstance(value, weakref.ReferenceType)
    return _dynamo_wrapper(value) or (
        isinstance(value, types.FunctionType)
        and value.__code__.co_name.startswith("torch_dynamo_resume_in_")
    )


def dynamo_removed(key: str, old: Any, namespace: dict[str, Any]) -> bool:
    """A helper dynamo put in a module's globals, deleted since (its compiled frame's cache
    entry died with the objects it guarded on).  Replacing one is never torch's doing:
    bytecode compiled before names it."""
    return key not in namespace and dynamo_global(key, old)


def only_torch_compile(route: Any) -> bool:
    """Whether every difference of a namespace route (monitor/identity.py) from its
    baseline is torch.compile's own doing."""
    spaces, before = route.spaces, route._values
    if not spaces:
        return False
    # Past the namespaces' values, a route reads its functions' code, defaults and
    # closures: those must be the very objects of the baseline.
    now_all = route.read()
    tail = len(now_all) - sum(len(vars(ns)) for ns in spaces)
    then = route.baseline[len(route.baseline) - tail :] if tail > 0 else ()
    if (
        tail < 0
        or len(then) != tail
        or any(a is not b for a, b in zip(now_all[-tail:] if tail else (), then, strict=True))
    ):
        return False
    found = False
    for ns, was in zip(spaces, before, strict=True):
        now = vars(ns)
        if any(not dynamo_removed(k, was[k][0], now) for k in set(was) - set(now)):
            return False  # something removed
        for key, value in list(now.items()):
            if key not in was:
                if not dynamo_global(key, value) and not _wraps_inherited(ns, key, value):
                    return False
                found = True
                continue
            old, codes = was[key]
            if any(f.__code__ is not c for f, c in codes):
                return False  # a function's code swapped in place
            if value is not old:
                if not _wraps(value, old):
                    return False
                found = True
    return found
