"""The attack surface of a training step: every callable it can look up by name.

``identity.py`` watches the routes the guard knows the step takes (the
optimizer's class, clipping, the loss module, hooks).  A red team went round
them through names those routes call at every step: ``torch.relu`` (which
``F.relu`` looks up), ``torch._C._nn.cross_entropy_loss``, ``Tensor.addcdiv_``
inside Adam, and the guard's own clock.  Instead of a longer list, this module
takes *every* callable attribute of the namespaces a step can reach (torch,
its C namespaces, Tensor and TensorBase, torch.nn.functional, torch.optim,
torch.autograd, torch.utils.data, the classes of torch.nn.modules) and of
trainguard's own monitor and ledger, and remembers the object installed under
each name, and for Python functions their code, defaults and closure.  Nothing
is unwrapped: a ``functools.wraps`` wrapper is a different object.

Each namespace keeps its names in a fixed order, so reading all of its values
is one ``operator.itemgetter`` call in C and comparing them to the baseline is
one tuple comparison of ids: still, a full sweep costs a few milliseconds,
so the check reads most of it in slices (checks/surface.py).  A callable
*added* under a new name (``Tensor.addcdiv_`` set on the subclass, shadowing TensorBase's) counts
as a change too; new modules and plain values (lazy imports, caches) do not.
"""

from __future__ import annotations

import operator
import os
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from trainguard.monitor import provenance
from trainguard.monitor.compiled import dynamo_global, dynamo_removed

# Module prefixes whose modules (and the classes defined in them) are part of the surface.
MODULE_PREFIXES = (
    "torch.optim",
    "torch.nn.utils",
    "torch.nn.parameter",
    "torch.functional",
    "torch.random",
    "torch.amp",
    "torch._VF",
    "torch.autograd",
    "torch.utils.data",
    "torch.nn.modules",
    "trainguard.monitor",
    "trainguard.ledger",
)
MAX_LAYERS = 8  # wrappers followed at most this deep
IMMUTABLE_TYPE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE
MAX_NAMESPACES = 5000  # a bound on what one guard watches (torch has about 600 here)


def _fixed_namespaces() -> list[tuple[str, Any]]:
    import torch
    import torch.nn.functional as F

    return [
        ("torch", torch),
        ("torch.nn.functional", F),
        ("torch._C._nn", torch._C._nn),
        # An instance without a __dict__: its functions live in its class.
        ("torch._C._VariableFunctions", type(torch._C._VariableFunctions)),
        ("torch.Tensor", torch.Tensor),
        ("torch._C.TensorBase", torch._C.TensorBase),
    ]


def namespaces() -> list[tuple[str, Any]]:
    """(label, namespace) for every namespace of the surface, as loaded now."""
    found = _fixed_namespaces()
    seen = {id(ns) for _, ns in found}
    for name, mod in sorted(sys.modules.items()):
        if mod is None or not name.startswith(MODULE_PREFIXES):
            continue
        for label, ns in [(name, mod), *_classes(name, mod)]:
            if id(ns) not in seen and len(found) < MAX_NAMESPACES:
                seen.add(id(ns))
                found.append((label, ns))
    return found


def _classes(name: str, mod: Any) -> Iterator[tuple[str, type]]:
    """The classes a module defines: their methods are looked up at each call too."""
    for key, value in list(vars(mod).items()):
        if isinstance(value, type) and getattr(value, "__module__", None) == name:
            yield f"{name}.{key}", value


def _code(value: Any) -> bool:
    """Whether a namespace entry is code the step may run: a callable or a descriptor
    (a property, classmethod or C getset runs code on attribute access); modules and
    plain data are not (lazy imports and caches add those honestly)."""
    if isinstance(value, types.ModuleType):
        return False
    return callable(value) or hasattr(type(value), "__get__")


def _watched(value: Any) -> bool:
    """Code, and modules: ``F._VF`` or ``torch.optim.adam.torch`` replaced by a look-alike
    is a patch of everything looked up through it (a *new* module name is not)."""
    return isinstance(value, types.ModuleType) or _code(value)


@dataclass
class Space:
    """One namespace: its callable names, in a fixed order, and what they held."""

    label: str
    ns: Any
    keys: tuple[str, ...] = ()
    values: tuple[Any, ...] = ()
    codes: tuple[int, ...] = ()
    size: int = 0
    _get: Callable[[Any], Any] = field(default=lambda d: ())
    _fns: tuple[types.FunctionType, ...] = ()
    _ids: tuple[int, ...] = ()
    _kept: tuple[Any, ...] = ()
    _cells: tuple[tuple[int, ...], ...] = ()  # per function, what its closure cells hold
    _held: tuple[Any, ...] = ()  # those objects, kept alive (no id is reused)
    _keyset: frozenset[str] = frozenset()
    only: frozenset[str] | None = None  # watch just these names (and any added name)

    def take(self) -> None:
        d = vars(self.ns)
        every = tuple([k for k, v in list(d.items()) if _watched(v)])
        self._keyset = frozenset(every)
        self.keys = every if self.only is None else tuple([k for k in every if k in self.only])
        self._get = operator.itemgetter(*self.keys) if self.keys else (lambda d: ())
        self.values = self._read(d)
        self._ids = tuple(map(id, self.values))
        self._fns = tuple([v for v in self.values if isinstance(v, types.FunctionType)])
        self._kept = self._parts()
        self.codes = tuple(map(id, self._kept))
        self._cells = tuple(list(map(provenance.cells, self._fns)))
        self._held = tuple([o for f in self._fns for o in provenance.kept_cells(f)])
        self.size = len(d)

    def _read(self, d: Any) -> tuple[Any, ...]:
        got = self._get(d)
        return got if len(self.keys) != 1 else (got,)

    def _parts(self) -> tuple[Any, ...]:
        fns = self._fns
        return (
            *map(operator.attrgetter("__code__"), fns),
            *map(operator.attrgetter("__defaults__"), fns),
            *map(operator.attrgetter("__kwdefaults__"), fns),
        )  # __closure__ is read-only: a new closure needs a new function

    def _codes(self) -> tuple[int, ...]:
        # By id: the baseline keeps every object alive (``_kept``), so no id is reused,
        # and an object's own __eq__ (an attacker's "always equal") is never asked.
        return tuple(map(id, self._parts()))

    def same(self, code: bool = True) -> bool:
        """Whether every name still holds the object it held (one C-speed pass), and with
        ``code`` whether each function keeps its code and defaults (a slower pass)."""
        d = vars(self.ns)
        try:
            if tuple(map(id, self._read(d))) != self._ids:
                return False
        except Exception:  # a name deleted (KeyError)
            return False
        if code and self._codes() != self.codes:
            return False
        if code and tuple(list(map(provenance.cells, self._fns))) != self._cells:
            return False  # a closure cell now holds another object
        return len(d) == self.size or not self._added()

    def _added(self) -> list[str]:
        return [k for k, v in list(vars(self.ns).items()) if k not in self._keyset and _code(v)]

    def differences(self, trusted: str = "") -> list[str]:
        """The names that changed (replaced, code swapped, deleted or added callables).

        With ``trusted`` (torch's folder), a name replaced by a wrapper made only of code
        torch compiled (provenance.py: the code object, never its file name) whose
        ``__wrapped__`` chain reaches the object it replaced is not a change:
        ``torch.compile`` wraps every optimizer's ``_init_group`` and ``Module.__init__``
        in torch's own "disable dynamo" wrappers when it first loads.
        """
        d = vars(self.ns)
        out = []
        old_of = dict(zip(self.keys, self.values, strict=True))
        fn_index = {id(f): i for i, f in enumerate(self._fns)}
        n = len(self._fns)
        for key, old in zip(self.keys, self.values, strict=True):
            now = d.get(key)
            if now is not old:
                out.append(key)
            elif id(old) in fn_index:
                i = fn_index[id(old)]
                if provenance.cells(old) != self._cells[i]:
                    out.append(key)  # same function, code and closure tuple; new contents
                    continue
                parts = (old.__code__, old.__defaults__, old.__kwdefaults__)
                kept = [self._kept[i + j * n] for j in range(3)]
                if any(id(p) != self.codes[i + j * n] for j, p in enumerate(parts)):
                    # torch.compile also swaps in an equal code object from torch's files.
                    if not (trusted and _same_code(parts, kept, trusted)):
                        out.append(key)
        # Helpers dynamo adds to a compiled frame's module globals, and deletes (compiled.py).
        added = [k for k in self._added() if not dynamo_global(k, d.get(k))]
        out = [k for k in out if not dynamo_removed(k, old_of[k], d)]
        if trusted:
            out = [k for k in out if not _wraps_from(d.get(k), old_of[k], trusted)]
            added = [k for k in added if not _wraps_from(d.get(k), self._inherited(k), trusted)]
            # What the bases held when the check started, not what wraps it now.
            added = [k for k in added if not _wraps_from(d.get(k), self._first(k), trusted)]
        return [f"{self.label}.{k}" for k in out + added]

    def _first(self, key: str) -> Any:
        """The innermost ``__wrapped__`` of what the bases hold now."""
        found = self._inherited(key)
        for _ in range(MAX_LAYERS):
            inner = getattr(found, "__dict__", {}).get("__wrapped__")
            if inner is None:
                return found
            found = inner
        return found

    def _inherited(self, key: str) -> Any:
        """What a class's name resolved to in its bases (before something set it here)."""
        for base in getattr(self.ns, "__mro__", ())[1:]:
            if key in vars(base):
                return vars(base)[key]
        return None


def _wraps_from(new: Any, old: Any, folder: str) -> bool:
    """Whether ``new`` is a wrapper of ``old`` made only of torch's own code, or a copy of
    it (same code, globals, closure cells and defaults: the same behaviour).  ``folder``
    only says that torch wrappers are trusted at all; what is torch's own is decided by
    the code objects (provenance.py), never by ``co_filename``."""
    if new is None or old is None or new is old:
        return False
    owns = provenance.torch_code().owns
    if _copy_of(new, old):
        return owns(new)
    for _ in range(MAX_LAYERS):
        if not isinstance(new, types.FunctionType) or not owns(new):
            return False
        inner = new.__dict__.get("__wrapped__")
        # A wrapper without __wrapped__ holds what it wraps in a closure cell
        # (torch._dynamo's Module.__init__ guard does).
        cells = provenance.cell_values(new)
        if not all(_torch_made(c, old, folder) for c in cells):
            return False  # it also holds code from elsewhere (a context manager, a hook)
        if inner is old or any(c is old for c in cells):
            return True
        if inner is None:
            return False
        new = inner
    return False


def _torch_made(obj: Any, old: Any, folder: str, depth: int = 0) -> bool:
    """Whether a closure value is harmless: the wrapped object, plain data, a C builtin,
    or a function torch compiled whose own closure is harmless too."""
    if obj is old or not callable(obj) or isinstance(obj, types.BuiltinFunctionType):
        return True
    if depth >= MAX_LAYERS:
        return False
    if not isinstance(obj, types.FunctionType):  # an instance of one of torch's classes
        path = getattr(sys.modules.get(type(obj).__module__), "__file__", None) or "?"
        return os.path.abspath(path).startswith(folder)
    if not provenance.torch_code().owns(obj):
        return False
    return all(_torch_made(c, old, folder, depth + 1) for c in provenance.cell_values(obj))


def _same_code(parts: tuple[Any, ...], kept: list[Any], folder: str) -> bool:
    """(code, defaults, kwdefaults) now against before: an equal code object (same
    bytecode, constants and names: the same behaviour, whatever file it names) and the
    very same defaults."""
    code, old = parts[0], kept[0]
    return bool(code == old) and parts[1] is kept[1] and parts[2] is kept[2]


def _copy_of(new: Any, old: Any) -> bool:
    if not isinstance(new, types.FunctionType) or not isinstance(old, types.FunctionType):
        return False
    same = (
        new.__code__ == old.__code__
        and new.__globals__ is old.__globals__
        and _identical(provenance.cell_values(new), provenance.cell_values(old))
        and _identical(new.__defaults__, old.__defaults__)
    )
    return same and _identical(
        tuple((new.__kwdefaults__ or {}).items()), tuple((old.__kwdefaults__ or {}).items())
    )


def _identical(a: Any, b: Any) -> bool:
    """Element by element by identity (an attacker's __eq__ is never asked)."""
    a, b = tuple(a or ()), tuple(b or ())
    return len(a) == len(b) and all(
        x is y or (isinstance(x, tuple) and _identical(x, y)) for x, y in zip(a, b, strict=True)
    )


def immutable(ns: Any) -> bool:
    """A C type whose attributes cannot be set (TensorBase, _VariableFunctionsClass)."""
    return isinstance(ns, type) and bool(ns.__flags__ & IMMUTABLE_TYPE)


def part(space: Space, names: set[str]) -> Space:
    """The same namespace, watching only ``names`` (and whether a callable was added)."""
    found = Space(space.label, space.ns, only=frozenset(names))
    found.take()
    return found


def snapshot() -> list[Space]:
    spaces = [Space(label, ns) for label, ns in namespaces()]
    for s in spaces:
        s.take()
    return spaces


class Flat:
    """Many spaces checked in a few C-level passes (``map`` over dicts and keys at once):
    the per-namespace Python overhead of :meth:`Space.same` is what a step would pay."""

    def __init__(self, spaces: list[Space]) -> None:
        self.spaces = spaces
        self.rebuild()

    def rebuild(self) -> None:
        spaces = self.spaces
        self._dicts = tuple([vars(s.ns) for s in spaces for _ in s.keys])
        self._keys = tuple([k for s in spaces for k in s.keys])
        self._ids = tuple([id(v) for s in spaces for v in s.values])
        self._fns = tuple([f for s in spaces for f in s._fns])
        self._codes = tuple([c for s in spaces for c in s.codes[: len(s._fns)]])
        closed = [(f, c) for s in spaces for f, c in zip(s._fns, s._cells, strict=True) if c]
        self._closed = tuple([f for f, _ in closed])
        self._cells = tuple([c for _, c in closed])
        self._spaces = tuple([vars(s.ns) for s in spaces])
        self._sizes = tuple([s.size for s in spaces])

    def replaced(self) -> bool:
        """The two identity passes alone (the objects under the names, the functions'
        code): for checks between the step hooks (each forward), where the closure
        cells' and sizes' passes would double the cost; :meth:`changed` names what moved."""
        try:
            same = tuple(map(id, map(operator.getitem, self._dicts, self._keys))) == self._ids
        except KeyError:
            return True
        return not same or tuple(map(id, map(_CODE, self._fns))) != self._codes

    def changed(self) -> list[Space]:
        """The spaces whose names changed (the fast passes say whether to look closer)."""
        try:
            same = tuple(map(id, map(operator.getitem, self._dicts, self._keys))) == self._ids
        except KeyError:
            same = False
        # __code__ every time; defaults (rarely the attack) in the slower per-space pass.
        same = same and tuple(map(id, map(_CODE, self._fns))) == self._codes
        same = same and tuple(list(map(provenance.cells, self._closed))) == self._cells
        if same and tuple(map(len, self._spaces)) == self._sizes:
            return []
        found = [s for s in self.spaces if not s.same()]
        if not found:  # a module or plain value was added: honest, take the new sizes
            for s in self.spaces:
                s.size = len(vars(s.ns))
            self.rebuild()
        return found


_CODE = operator.attrgetter("__code__")
