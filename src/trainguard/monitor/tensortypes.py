"""Which tensor classes may carry the run's tensors: torch's own, or ones the user declared.

A Python subclass of ``torch.Tensor`` runs its own code on every op that touches one of
its instances: ``__torch_function__`` (and ``__torch_dispatch__``, and any method it
overrides) is called with the op and its arguments, no mode, kernel, renamed function
or hook involved.  Red team s5 planted one through the data (a "data library" returned
the features as such a class: the first layer computed with noisy weights and its
gradient scaled by -0.3, the weights' bits untouched) and through ``__class__``
assignment on a parameter, before ``watch()`` and mid-run from a thread.

The invariant: every tensor the guard sees (parameters, their gradients, optimizer
state, the batch) is of a class whose code is torch's own, or of a class the user
declared with ``watch(..., tensor_types=[...])``.  "Torch's own" is decided by the code
(monitor/provenance.py: every function in the class, its bases up to ``torch.Tensor``
and its metaclass compiled by torch, with a torch module's globals), never by the
module name a class claims.  A declared class is held by identity, with the identity
of every code object it runs: patching its methods after ``watch()`` makes it foreign.
What that code reads is held too, by value (monitor/valuedigest.py): the class's data
attributes, its functions' defaults, closures and the globals they read.  Red team s5
A10 set ``QParam.BITS = 2`` mid-run on a declared fake-quant class: held by name only,
it passed.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterable, Sequence
from typing import Any

from trainguard.monitor import provenance
from trainguard.monitor.valuedigest import ValueDigest

MAX_NAMED = 5
_TORCH = "torch"
# Class attributes that are data, never code run on an op.
_DATA = (str, bytes, int, float, bool, tuple, frozenset, type(None))


def _functions(value: Any) -> list[Any] | None:
    """The functions a class attribute runs (unwrapped descriptors); None for a callable
    that is neither a Python function nor a builtin (a partial, an object with __call__):
    code that cannot be told apart from anyone else's."""
    if isinstance(value, (staticmethod, classmethod)):
        return _functions(value.__func__)
    if isinstance(value, property):
        found: list[Any] = []
        for part in (value.fget, value.fset, value.fdel):
            if part is not None:
                inner = _functions(part)
                if inner is None:
                    return None
                found += inner
        return found
    if isinstance(value, types.FunctionType):
        return [value]
    if isinstance(value, (types.BuiltinFunctionType, types.WrapperDescriptorType)):
        return [value]
    if isinstance(value, _DATA) or isinstance(value, type) or not callable(value):
        return []  # data, a nested class (judged where it is used), descriptors of slots
    return None


def _own_classes(cls: type, base: tuple[type, ...]) -> list[type]:
    """The classes whose dicts decide what ``cls`` runs: its MRO up to torch's bases, and
    its metaclass's MRO up to ``type``."""
    found = [k for k in cls.__mro__ if k not in base and k is not object]
    meta: Any = type(cls)  # (mypy reads type(cls).__mro__ as type's own method)
    found += [k for k in meta.__mro__ if k not in (type, object)]
    return found


def code_ids(cls: type, base: tuple[type, ...]) -> tuple[int, ...] | None:
    """The identity of every code object ``cls`` runs (functions by their code, builtins
    by themselves), in a fixed order; None when some callable is of no kind we can name."""
    ids: list[int] = []
    for k in _own_classes(cls, base):
        for name, value in sorted(vars(k).items()):
            fns = _functions(value)
            if fns is None:
                return None
            ids += [id(getattr(f, "__code__", f)) for f in fns]
            ids.append(hash(name))
    return tuple(ids)


def namespace(cls: type, base: tuple[type, ...]) -> list[tuple[str, Any]]:
    """What the class's code reads from it: every attribute of the classes that decide
    what ``cls`` runs (functions unwrapped from their descriptors), by label."""
    out: list[tuple[str, Any]] = []
    for k in _own_classes(cls, base):
        for name, value in sorted(vars(k).items()):
            label = f"{k.__qualname__}.{name}"
            fns = _functions(value)
            if fns:
                out += [(f"{label}[{i}]", f) for i, f in enumerate(fns)]
            else:
                out.append((label, value))
    return out


def torch_made(cls: type, base: tuple[type, ...]) -> bool:
    """Whether every function ``cls`` runs beyond ``torch.Tensor``'s own is torch's code."""
    owns = provenance.torch_code().owns
    for k in _own_classes(cls, base):
        for value in list(vars(k).values()):
            fns = _functions(value)
            if fns is None:
                return False
            for f in fns:
                if isinstance(f, types.FunctionType):
                    if not owns(f):
                        return False
                elif not _torch_builtin(f, base):
                    return False
    return True


def _torch_builtin(f: Any, base: tuple[type, ...]) -> bool:
    """A builtin of torch's C code, a slot wrapper of a C type torch defines
    (``torch._C._TensorMeta.__init__``) or of torch's bases, or a builtin method bound
    to a torch class, or one of ``torch._C.TensorBase``'s own (DTensor's ``__new__``)."""
    if str(getattr(f, "__module__", "") or "").startswith(_TORCH):
        return True
    name = getattr(f, "__name__", "")
    if any(getattr(b, name, None) is f for b in base):  # TensorBase's static _dtensor__new__
        return True
    owner = getattr(f, "__objclass__", None) or getattr(f, "__self__", None)
    if owner in (*base, object):
        return True
    if isinstance(owner, types.ModuleType):
        return owner.__name__.startswith(_TORCH)
    home = owner if isinstance(owner, type) else type(owner)
    return str(getattr(home, "__module__", "")).startswith(_TORCH)


class TypeJudge:
    """Decides, once per class, whether tensors of that class may carry the run."""

    def __init__(self, declared: Iterable[type] = ()) -> None:
        import torch

        self.torch = torch
        self.base: tuple[type, ...] = (torch.Tensor, torch._C.TensorBase)
        self.plain = {torch.Tensor, torch.nn.Parameter}
        # Declared classes with the code they ran at watch(): a later patch is foreign.
        self.declared: dict[type, tuple[int, ...] | None] = {
            c: code_ids(c, self.base) for c in declared
        }
        # ... and what that code reads (data attributes, defaults, globals), by value.
        self.values = {
            c: ValueDigest(functools.partial(namespace, c, self.base)) for c in self.declared
        }
        self.patched: set[type] = set()  # declared classes whose code changed since
        self._kept = list(self.declared)  # ids above stay unique while the guard lives
        self._verdicts: dict[type, str | None] = {}
        uninit = getattr(torch.nn.parameter, "UninitializedTensorMixin", None)
        self._lazy = uninit

    def why(self, cls: type) -> str | None:
        """None when tensors of ``cls`` may carry the run; else why not."""
        if cls in self.plain:
            return None
        if cls in self.declared:
            return None
        if cls in self.patched:
            return f"declared class {_name(cls)}, its code or data changed since watch()"
        if cls not in self._verdicts:
            self._kept.append(cls)
            self._verdicts[cls] = (
                None
                if torch_made(cls, self.base)
                else f"{_name(cls)}, a tensor class that is not torch's own and was not "
                "declared with watch(tensor_types=...)"
            )
        return self._verdicts[cls]

    def repatched(self) -> bool:
        """Whether a declared class runs other code than at watch(), or its code reads
        other values (it is foreign from then on): a few dozen attribute reads and
        comparisons per declared class."""
        changed = [
            c
            for c, ids in self.declared.items()
            if code_ids(c, self.base) != ids or self.values[c].changed()
        ]
        for c in changed:
            del self.declared[c]
            self.patched.add(c)
        return bool(changed)

    def materialized(self, was: type, now: type) -> bool:
        """A lazy module's parameter turning into its ``cls_to_become`` at the first
        forward (torch's own ``materialize``)."""
        lazy = self._lazy
        return (
            lazy is not None
            and issubclass(was, lazy)
            and now is getattr(was, "cls_to_become", None)
            and self.why(was) is None
        )


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def foreign(judge: TypeJudge, named: Sequence[tuple[str, Any]]) -> dict[str, str]:
    """Of ``named`` tensors, those of a class that may not carry the run, with why."""
    out: dict[str, str] = {}
    for name, t in named:
        if t is None:
            continue
        why = judge.why(type(t))
        if why is not None:
            out[name] = why
    return out
