"""What a set of functions computes with, by value: a digest to compare later.

A deep copy, or a held ``__code__``, keeps function objects by reference: the defaults,
closure cells, a ``functools.partial``'s keywords and the globals a function reads are
shared with whoever holds the function, so an in-place change compares equal to itself
(red team 4 A02 through a scheduler's lambda; red team s5 A2 through a declared
``grad_transform``, A10 through a declared tensor class's data attributes).  A
:class:`ValueDigest` takes, from the callables its ``roots`` give, each function's code,
defaults, keyword defaults, closure contents and the globals its code reads (followed
into the functions and partials those name), a partial's function, args and keywords,
and a callable object's attributes and its class's ``__call__``: plain data copied,
tensors by their elements, other objects by identity (monitor/checks/scheduler.py,
monitor/gradtransform.py, monitor/tensortypes.py).
Not seen: code that reads globals by name (``globals()[...]``), attributes of objects
more than one level below a global or cell, and functions of other modules.
"""

from __future__ import annotations

import dis
import functools
import types
from collections.abc import Callable
from typing import Any

MAX_FUNCTIONS = 200  # functions followed from one digest's roots
MAX_ITEMS = 4096  # elements of a container or tensor snapshotted by value

Roots = Callable[[], list[tuple[str, Any]]]


class ValueDigest:
    """The callables ``roots()`` names (label, callable), digested by value; ``copied``:
    callable objects whose attributes another copy holds (compared there), read by type."""

    def __init__(self, roots: Roots, copied: bool = False) -> None:
        self.roots = roots
        self.copied = copied
        # The global names a code object loads, by the code object (its bytecode is read
        # once: a new code object is a new key, and is itself compared).
        self._names: dict[int, tuple[types.CodeType, list[str]]] = {}
        self.baseline = self._read()

    def _read(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        todo = list(self.roots())
        held = {id(v) for _, v in todo} if self.copied else set()
        seen: set[int] = set()
        while todo and len(seen) < MAX_FUNCTIONS:
            label, obj = todo.pop(0)
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, functools.partial):
                out[label] = (obj.func, _snap(obj.args), _snap(obj.keywords))
                todo.append((f"{label}.func", obj.func))
                continue
            if not isinstance(obj, types.FunctionType):
                # A callable object: its attributes (unless the copy holds its own).
                out[label] = (type(obj),) if id(obj) in held else (type(obj), _snap(obj))
                call = vars(type(obj)).get("__call__")  # its class's own, not inherited
                if isinstance(call, types.FunctionType):
                    todo.append((f"{label}.__call__", call))
                continue
            cells = []
            for cell in obj.__closure__ or ():
                try:
                    cells.append(cell.cell_contents)
                except ValueError:  # an empty cell (a name assigned later)
                    cells.append(_EMPTY)
            space = obj.__globals__
            code = obj.__code__
            cached = self._names.get(id(code))
            if cached is None or cached[0] is not code:
                cached = self._names[id(code)] = (code, _global_loads(code))
            names = cached[1]
            out[label] = (obj.__code__, _snap(obj.__defaults__), _snap(obj.__kwdefaults__))
            named = [(f"{label}.<cell {i}>", c) for i, c in enumerate(cells)]
            named += [(f"{label}.{n}", space.get(n, _EMPTY)) for n in names]
            out.update((lab, _snap(v)) for lab, v in named)
            todo += [(lab, v) for lab, v in named if _followed(v)]
        return out

    def changed(self) -> list[str]:
        """What differs from the baseline, by label; takes the new baseline (once)."""
        now = self._read()
        out = []
        for label in sorted(set(now) | set(self.baseline)):
            try:
                same = bool(now.get(label, _EMPTY) == self.baseline.get(label, _EMPTY))
            except Exception:  # an object whose == raises is not the one we saw
                same = False
            if not same:
                out.append(label)
        self.baseline = now
        return out


def _followed(v: Any) -> bool:
    return isinstance(v, (types.FunctionType, functools.partial))


def _global_loads(code: types.CodeType) -> list[str]:
    """The global names a function's code (and the code nested in it) loads."""
    names: set[str] = set()
    todo, seen = [code], 0
    while todo and seen < MAX_FUNCTIONS:
        c = todo.pop()
        seen += 1
        todo += [k for k in c.co_consts if isinstance(k, types.CodeType)]
        for ins in dis.get_instructions(c):
            if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
                names.add(str(ins.argval))
    return sorted(names)


def _snap(v: Any, depth: int = 0) -> Any:
    """A value to compare later: plain data by value (copied), tensors by their elements,
    an object's plain attributes one level down, anything else by identity."""
    if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        return v
    if depth > 3:
        return ("id", id(v))
    if isinstance(v, (list, tuple, set, frozenset)):
        items = sorted(v, key=repr) if isinstance(v, (set, frozenset)) else list(v)
        return (type(v), tuple([_snap(x, depth + 1) for x in items[:MAX_ITEMS]]), len(v))
    if isinstance(v, dict):
        pairs = list(v.items())[:MAX_ITEMS]
        return (dict, tuple([(repr(k), _snap(x, depth + 1)) for k, x in pairs]), len(v))
    if isinstance(v, (types.ModuleType, type, types.FunctionType, functools.partial)):
        return ("id", id(v), v)  # functions and partials are followed by themselves
    if hasattr(v, "detach") and hasattr(v, "numel"):  # a tensor (not its class): its values
        t = v.detach()
        head = t.reshape(-1)[:MAX_ITEMS].tolist() if t.device.type != "meta" else []
        return ("tensor", str(t.dtype), tuple(t.shape), tuple(head))
    attrs = getattr(v, "__dict__", None)
    if isinstance(attrs, dict) and depth < 2:
        return ("obj", id(v), _snap(attrs, depth + 1))
    return ("id", id(v), v)


class _Empty:
    def __repr__(self) -> str:
        return "<unset>"


_EMPTY = _Empty()
