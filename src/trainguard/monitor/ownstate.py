"""trainguard's own module state: the namespaces of ``trainguard.monitor`` as imported.

Red team 2026-12-05 (A12): ``update_models.MODELS.clear()``,
``state_models.MODELS.clear()`` and ``direction.SIZE_TOLERANCE = 1e9`` silenced the
update and state checks with no alert: the self-check (integrity.py) held the
guard's objects, not the module globals its checks read.  Constants, thresholds and
registries are plain values; identity and surface checks watch torch, not us.

The invariant: after import, the modules of ``trainguard.monitor`` keep their
globals.  A :class:`Snapshot` holds, per module and global name, the value and
what it is made of, all by identity: a table's entries (dict, list, tuple, set,
to depth :data:`MAX_DEPTH`), a function's code, defaults and closure, a class's
namespace (its methods' code too), and the attributes of trainguard's own objects
held in tables (an update model's fields).  Two snapshots are compared in C
(tuple comparison tries identity first).

A table may grow (``update_models.register`` adds a model for a script's
optimizer; a cache asked once fills) but keeps every entry it held, unchanged;
a global may be added, and one that was None set (a value computed on first
use); a module imported later is taken when first seen.
Anything else is a change: a global rebound, an entry removed or replaced, a
function's code or defaults swapped, a class attribute set.  State that is
*meant* to change otherwise is named in :data:`MUTABLE` (each guard's
self-check, the record of torch's compiled code), nothing else.
"""

from __future__ import annotations

import operator
import sys
import types
from collections import deque
from collections.abc import Iterator
from typing import Any

PACKAGE = "trainguard.monitor"
MAX_DEPTH = 3  # containers followed inside a global (a table of tuples of thresholds)
MAX_ITEMS = 5_000  # entries followed per global (a large cache is identity only)
# Globals that change by design while guards run (looked up by module and name).
MUTABLE: frozenset[tuple[str, str]] = frozenset(
    {
        ("trainguard.monitor.integrity", "_checks"),  # each guard's self-check
        # What torch compiled, recorded as torch imports modules (grows at any time).
        ("trainguard.monitor.provenance", "_TORCH_CODE"),
    }
)
IGNORED = frozenset({"__warningregistry__"})  # the warnings module writes it in any module
# Class attributes Python itself writes: copy and pickle cache a class's slot names on it,
# reading the annotations of a class that has none stores an empty dict.
CLASS_IGNORED = frozenset({"__dict__", "__weakref__", "__slotnames__", "__annotations__"})

Entries = dict[str, tuple[Any, ...]]


def _made_of(v: Any, owner: str, depth: int) -> Iterator[Any]:
    """The objects ``v`` is made of, by identity (see the module docstring)."""
    if depth <= 0:
        return
    if isinstance(v, types.ModuleType):
        return  # another module: its identity is enough (its own globals are its own)
    if isinstance(v, (dict, types.MappingProxyType)):
        items = list(v.items())[:MAX_ITEMS]
        for k, x in items:
            yield k
            yield x
            yield from _made_of(x, owner, depth - 1)
        yield len(v)
    elif isinstance(v, (list, tuple, set, frozenset, deque)):
        items = list(v)[:MAX_ITEMS]
        yield len(v)
        for x in items:
            yield x
            yield from _made_of(x, owner, depth - 1)
    elif isinstance(v, types.FunctionType):
        yield from (v.__code__, v.__defaults__, v.__kwdefaults__)
        for cell in v.__closure__ or ():
            try:
                yield cell.cell_contents
            except ValueError:  # an empty cell (a name not bound yet)
                yield None
    elif isinstance(v, (staticmethod, classmethod, property)):
        for part in (getattr(v, "__func__", None), getattr(v, "fget", None)):
            if part is not None:
                yield part
                yield from _made_of(part, owner, depth - 1)
    elif isinstance(v, type):
        if v.__module__ != owner:
            return  # imported from elsewhere: its own module's snapshot has it
        for k, x in list(vars(v).items()):
            if k in CLASS_IGNORED:
                continue
            yield k
            yield x
            yield from _made_of(x, owner, depth - 1)
    elif type(v).__module__.startswith("trainguard.") and hasattr(v, "__dict__"):
        # One of our objects held in a table (an update model): its fields.
        yield from _made_of(vars(v), owner, depth - 1)


def entries(module: types.ModuleType) -> Entries:
    """Per global name of ``module``: its value and what it is made of."""
    name = module.__name__
    return {
        k: (v, *_made_of(v, name, MAX_DEPTH))
        for k, v in list(vars(module).items())
        if (name, k) not in MUTABLE and k not in IGNORED
    }


def modules() -> dict[str, types.ModuleType]:
    return {
        n: m
        for n, m in list(sys.modules.items())
        if isinstance(m, types.ModuleType) and (n == PACKAGE or n.startswith(PACKAGE + "."))
    }


class Parts:
    """What the namespaces are made of, found once (a walk in Python), read at each
    check with C-speed calls: the dicts' keys and values, the containers' elements,
    the functions' code, defaults and closures, the cells' contents."""

    def __init__(self, mods: dict[str, types.ModuleType]) -> None:
        self.dicts: list[Any] = []
        self.seqs: list[Any] = []
        self.fns: list[types.FunctionType] = []
        self.cells: list[Any] = []
        seen: set[int] = set()
        for n, m in mods.items():
            self._walk(vars(m), n, MAX_DEPTH + 1, seen, top=True)

    def _walk(self, v: Any, owner: str, depth: int, seen: set[int], top: bool = False) -> None:
        if depth <= 0 or id(v) in seen or isinstance(v, types.ModuleType):
            return
        seen.add(id(v))
        if isinstance(v, (dict, types.MappingProxyType)):
            self.dicts.append(v)
            if len(v) > MAX_ITEMS and not top:
                return
            for k, x in list(v.items()):
                if top and ((owner, k) in MUTABLE or k in IGNORED):
                    continue
                self._walk(x, owner, depth - 1, seen)
        elif isinstance(v, (list, tuple, set, frozenset, deque)):
            self.seqs.append(v)
            for x in list(v)[:MAX_ITEMS]:
                self._walk(x, owner, depth - 1, seen)
        elif isinstance(v, types.FunctionType):
            self.fns.append(v)
            for x in (*(v.__defaults__ or ()), *(v.__kwdefaults__ or {}).values()):
                self._walk(x, owner, depth - 1, seen)
            for cell in v.__closure__ or ():
                try:
                    cell.cell_contents  # noqa: B018 - an empty cell raises
                except ValueError:
                    continue
                self.cells.append(cell)
        elif isinstance(v, (staticmethod, classmethod)):
            self._walk(v.__func__, owner, depth, seen)
        elif isinstance(v, property):
            for part in (v.fget, v.fset, v.fdel):
                if part is not None:
                    self._walk(part, owner, depth, seen)
        elif isinstance(v, type):
            if v.__module__ == owner:  # imported from elsewhere: its own module has it
                self._walk(vars(v), owner, depth, seen)
        elif type(v).__module__.startswith("trainguard.") and hasattr(v, "__dict__"):
            self._walk(vars(v), owner, depth - 1, seen)  # our object in a table: its fields

    def read(self) -> tuple[Any, ...]:
        out: list[Any] = []
        for d in self.dicts:
            out.append(len(d))
            out.extend(d.keys())
            out.extend(d.values())  # a module's: its ignored names are last added, if ever
        for s in self.seqs:
            out.append(len(s))
            out.extend(s)
        fns = self.fns
        out.extend(map(_CODE, fns))
        out.extend(map(_DEFAULTS, fns))
        out.extend(map(_KWDEFAULTS, fns))
        out.extend(map(_CLOSURE, fns))
        out.extend(map(_CONTENTS, self.cells))
        return tuple(out)


_CODE = operator.attrgetter("__code__")
_DEFAULTS = operator.attrgetter("__defaults__")
_KWDEFAULTS = operator.attrgetter("__kwdefaults__")
_CLOSURE = operator.attrgetter("__closure__")
_CONTENTS = operator.attrgetter("cell_contents")


class Snapshot:
    """The namespaces of the ``trainguard.monitor`` modules loaded when it was taken."""

    def __init__(self) -> None:
        self.modules = modules()
        self.entries = {n: entries(m) for n, m in self.modules.items()}
        self.parts = Parts(self.modules)
        self.flat = self.parts.read()
        # Each table's entries one by one, for "it only grew" (a cache filled once).
        self.tables = {
            (n, k): _rows(e[0], n) if type(e[0]) is dict else tuple(e[0])
            for n, per in self.entries.items()
            for k, e in per.items()
            if type(e[0]) in (dict, list, set, deque)
        }

    def unchanged(self) -> bool:
        """Whether every namespace still holds what it held (C-speed reads and one tuple
        comparison, identity first)."""
        try:
            now = self.parts.read()
            return bool(now == self.flat)
        except Exception:  # an emptied cell, a value whose == raises: not what we saw
            return False

    def changes(self, *, grow: bool = False) -> list[str]:
        """``module.name`` of each global that differs; ``grow``: a global added or a
        table that only gained entries is not a change (before ``watch()``)."""
        out = []
        for n, m in self.modules.items():
            before, now = self.entries[n], entries(m)
            for k in sorted(set(before) | set(now)):
                if k in before and k in now and _equal(before[k], now[k]):
                    continue
                if grow and (k not in before or (before[k][0] is None and k in now)):
                    continue  # a global added, or a lazily computed one set the first time
                if grow and k in now and before[k][0] is now[k][0] and (n, k) in self.tables:
                    if _grew(now[k][0], self.tables[n, k], n):
                        continue
                out.append(f"{n}.{k}")
        return out


def _grew(table: Any, kept: Any, owner: str) -> bool:
    """Whether ``table`` still holds every entry it held (``kept``), unchanged: a dict's
    keys and values, a list's first elements, a set's members."""
    if isinstance(kept, dict):
        rows = _rows(table, owner)
        return all(r in rows and _equal(rows[r], v) for r, v in kept.items())
    if isinstance(table, set):
        return all(x in table for x in kept)
    return len(table) >= len(kept) and all(map(operator.is_, list(table)[: len(kept)], kept))


def _rows(table: dict[Any, Any], owner: str) -> dict[Any, tuple[Any, ...]]:
    return {k: (v, *_made_of(v, owner, MAX_DEPTH - 1)) for k, v in list(table.items())}


def _same(a: Any, b: Any) -> bool:
    """Identity; a number or string rebuilt with the same value (a cached small int, a
    float made again) is the same value, which is all a constant is."""
    if a is b:
        return True
    return type(a) is type(b) and type(a) in (int, float, str, bytes, bool) and bool(a == b)


def _equal(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(map(_same, a, b))
