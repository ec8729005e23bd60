"""Is this function torch's own code?  Decided by the code object, never by its file name.

``compile(src, "torch/nn/functional.py", "exec")`` gives code whose ``co_filename``
says torch (red team #8: a wrapper forged that way was trusted as "torch wrapping its
own function").  A code object torch compiled is reachable from the modules torch
loaded: each module's functions, its classes' methods, and, recursively, the code
objects in their ``co_consts`` (nested functions, closures, lambdas).  This module
collects the ids of all of them once (and again for torch modules loaded since,
such as ``torch._dynamo`` when ``torch.compile`` first runs).  A function is
torch-made when its code is in that set and its ``__globals__`` is the dict of one of
torch's modules (torch's code run with an attacker's globals is not); surface.py
also asks the same of what its closure cells hold.

Cell *contents* are what a closure runs: ``clip_grad_norm_.__closure__[0]`` holds the
real function, and ``cell.cell_contents = evil`` keeps the function, its code and its
closure tuple (red team #7).  :func:`cells` names them by identity, recursively.
"""

from __future__ import annotations

import sys
import types
import warnings
from typing import Any

MAX_DEPTH = 4  # closures inside closures followed at most this deep
MAX_CELLS = 64  # cell contents compared per function at most (a bound on one read)
_PREFIX = "torch"


class TorchCode:
    """The code objects of torch's loaded modules, by id (kept alive, so ids stay unique)."""

    def __init__(self) -> None:
        self._codes: set[int] = set()
        self._dicts: set[int] = set()  # the globals of torch's modules
        self._kept: list[Any] = []
        self._seen: set[str] = set()

    def refresh(self) -> None:
        """Take in the torch modules loaded since the last call."""
        new = []
        for name, mod in list(sys.modules.items()):
            if name in self._seen or mod is None:
                continue
            if name != _PREFIX and not name.startswith(_PREFIX + "."):
                continue
            self._seen.add(name)
            home = getattr(mod, "__dict__", None)
            if isinstance(home, dict):
                self._dicts.add(id(home))
                self._kept.append(home)
                new.append(home)
        with warnings.catch_warnings():
            # Some module attributes warn when looked at (torch.distributed.reduce_op).
            warnings.simplefilter("ignore")
            for home in new:
                for value in list(home.values()):
                    self._take(value, 0)

    def _take(self, value: Any, depth: int) -> None:
        if depth > MAX_DEPTH:
            return
        if isinstance(value, (staticmethod, classmethod, property)):
            for part in (getattr(value, a, None) for a in ("__func__", "fget", "fset")):
                if part is not None:
                    self._take(part, depth + 1)
        elif isinstance(value, types.FunctionType):
            # Only functions that run with a torch module's globals were compiled there
            # (a function imported from elsewhere is taken, or not, with its own module).
            if id(value.__globals__) in self._dicts:
                self._code(value.__code__)
            inner = value.__dict__.get("__wrapped__")
            if inner is not None:
                self._take(inner, depth + 1)
        elif isinstance(value, type) and value.__module__.startswith(_PREFIX):
            for attr in list(vars(value).values()):
                self._take(attr, depth + 1)

    def _code(self, code: types.CodeType) -> None:
        stack = [code]
        while stack:
            c = stack.pop()
            if id(c) in self._codes:
                continue
            self._codes.add(id(c))
            self._kept.append(c)
            stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))

    def owns(self, fn: types.FunctionType) -> bool:
        """Whether ``fn`` runs code torch compiled, with the globals of one of its modules."""
        if id(fn.__code__) not in self._codes:
            self.refresh()
        return id(fn.__code__) in self._codes and id(fn.__globals__) in self._dicts


_TORCH_CODE = TorchCode()


def torch_code() -> TorchCode:
    return _TORCH_CODE


def filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def cell_values(fn: Any) -> list[Any]:
    """What ``fn``'s closure cells hold now (empty cells left out)."""
    closure = getattr(fn, "__closure__", None) or ()
    return [c.cell_contents for c in closure[:MAX_CELLS] if filled(c)]


def cells(fn: Any, depth: int = 0) -> tuple[int, ...]:
    """Ids of what ``fn``'s closure cells hold, and, for functions held there, of what
    theirs hold (to ``MAX_DEPTH``): equal ids, the same objects (kept alive by the
    caller's baseline, so an id is never reused)."""
    found: list[int] = []
    for value in cell_values(fn):
        found.append(id(value))
        if isinstance(value, types.FunctionType) and depth < MAX_DEPTH:
            inner = cells(value, depth + 1)
            if inner:
                found.extend((-1, *inner, -2))  # brackets: the nesting is part of the shape
    return tuple(found)


def kept_cells(fn: Any, depth: int = 0) -> list[Any]:
    """The objects :func:`cells` names, to keep them alive with a baseline."""
    out: list[Any] = []
    for value in cell_values(fn):
        out.append(value)
        if isinstance(value, types.FunctionType) and depth < MAX_DEPTH:
            out.extend(kept_cells(value, depth + 1))
    return out
