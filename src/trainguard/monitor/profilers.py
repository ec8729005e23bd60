"""Whether a trace or profile function is a known tool's, verified by what runs.

A name proves nothing: a class may set ``__module__ = "cProfile"`` and a function's
``__module__`` is writable.  What each kind of tool is checked by:

* a **C tracer of a static type** (coverage's ``CTracer``, Cython profilers): a type
  only C code can make, whose module (from its C name, not writable) is a tool's;
* **cProfile** (``_lsprof.Profiler``, which ``cProfile.Profile`` subclasses in Python):
  the object installed must not be callable (``sys.setprofile(obj)`` would call a
  subclass's ``__call__``; ``enable()`` installs the C callback with the object as its
  argument) and must time with the built-in clock: a ``timer=`` function runs at every
  call and return, so it is read from the profiler's C struct (its offset found once
  by building two profilers; when it cannot be found the profiler is not verified);
* **torch's profiler** (``with_stack=True``): the C tracer's ``TraceContext``, a static
  type named so, not callable, while torch's profiler is enabled;
* a **Python tool** (``pdb``/``bdb``, stdlib ``trace``, ``coverage``'s Python tracer,
  ``pydevd``): every function it runs, through bound methods, partials and
  ``__call__``, is a tool module's own code (its namespace and file) from installed
  code (the standard library or site-packages), and every method of its instance's
  class and that class's bases is installed code, so a subclass of ``bdb.Bdb`` that
  overrides ``user_line`` is not the tool.

Not verified: what a Python tool's instance attributes hold (``trace.Trace.ignore``)
and a tool module's globals patched with installed code; a C function installed
through ``ctypes``.  :func:`known` is cheap (no allocation on the cProfile and torch
paths) and is called again at every step for a tool held in ``guard.profiling()``:
types are mutable, and a timer can be swapped on a running profiler.
"""

from __future__ import annotations

import ctypes
import functools
import types
from typing import Any

from trainguard.monitor import identity
from trainguard.monitor.hookcode import home, targets

# Top-level packages of debuggers, profilers and coverage tools.
TOOLS = frozenset(
    {
        "bdb",
        "pdb",
        "trace",
        "cProfile",
        "profile",
        "_lsprof",
        "coverage",
        "pydevd",
        "_pydevd_bundle",
        "_pydev_bundle",
        "_pydevd_frame_eval",
        "debugpy",
        "pudb",
        "ipdb",
        "IPython",
        "line_profiler",
        "pyinstrument",
        "yappi",
        "viztracer",
        "scalene",
    }
)
HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: set on every class made by Python code
IMMUTABLE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE (3.10+): set only by C code
# What a Python tool installs: followed to the functions it runs.
PYTHON = (types.FunctionType, types.MethodType, functools.partial)
MAX_OFFSET = 256  # bytes of a profiler's struct searched for its timer field


def known(obj: Any) -> str:
    """The tool ``obj`` verifiably is ("cProfile", "torch.profiler", a module), or ""."""
    kind = type(obj)
    if _lsprof_base(kind) is not None:
        return "cProfile" if not callable(obj) and _default_timer(obj) else ""
    if _by_c(kind) and not isinstance(obj, PYTHON):
        if kind.__module__ == "builtins" and kind.__name__ == "TraceContext":
            return "torch.profiler" if not callable(obj) and _torch_profiling() else ""
        top = kind.__module__.split(".")[0]
        return kind.__module__ if top in TOOLS else ""
    return _python_tool(obj)


def _by_c(kind: type) -> bool:
    """Whether a type was made by C code: a static type, or a heap type made from a spec
    (immutable: a Python class never is, and its ``__module__`` cannot be rewritten)."""
    return not kind.__flags__ & HEAPTYPE or bool(kind.__flags__ & IMMUTABLE)


def _lsprof_base(kind: type) -> type | None:
    for base in kind.__mro__:
        if base.__module__ == "_lsprof" and base.__name__ == "Profiler" and _by_c(base):
            return base
    return None


def _torch_profiling() -> bool:
    import torch

    return bool(torch._C._autograd._profiler_enabled())


def _python_tool(obj: Any) -> str:
    found = targets(obj)
    if not found or not all(isinstance(f, types.FunctionType) for f in found):
        return ""
    homes = [home(f) for f in found]
    if not all(h and h.split(".")[0] in TOOLS for h in homes) or not all(map(_installed, found)):
        return ""
    owner = obj.__self__ if isinstance(obj, types.MethodType) else obj
    if not isinstance(owner, types.FunctionType) and not _class_installed(type(owner)):
        return ""
    return homes[0]


def _class_installed(kind: type) -> bool:
    """Every method of ``kind`` and its bases is installed code (a builtin base's are)."""
    for cls in kind.__mro__:
        if _by_c(cls):
            continue
        for value in vars(cls).values():
            fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if isinstance(fn, types.FunctionType) and not _installed(fn):
                return False
    return True


def _installed(fn: types.FunctionType) -> bool:
    code = fn.__code__  # by code object: a path's normalisation costs microseconds
    placed = _PLACED.get(code)
    if placed is None:
        if not _DIRS:  # sysconfig's paths are computed once (milliseconds a call)
            _DIRS.append(identity._trusted_dirs())
        placed = _PLACED[code] = identity.origin(fn).startswith(_DIRS[0])
    return placed


_DIRS: list[tuple[str, ...]] = []
_PLACED: dict[types.CodeType, bool] = {}


def _default_timer(profiler: Any) -> bool:
    """Whether a cProfile profiler times with its built-in clock (no ``timer=``)."""
    offset = _timer_offset()
    if offset is None:
        return False
    return not ctypes.c_void_p.from_address(id(profiler) + offset).value


_OFFSET: list[int | None] = []


def _timer_offset() -> int | None:
    """Where ``_lsprof.Profiler`` keeps its timer: the one pointer-aligned field that
    holds a given timer in one profiler and is empty in a default one."""
    if _OFFSET:
        return _OFFSET[0]
    import _lsprof

    def clock() -> float:
        return 0.0

    size = min(_lsprof.Profiler.__basicsize__, MAX_OFFSET)
    plain, timed = _lsprof.Profiler(), _lsprof.Profiler(clock)
    step = ctypes.sizeof(ctypes.c_void_p)
    found = [
        at
        for at in range(2 * step, size - step + 1, step)
        if ctypes.c_void_p.from_address(id(timed) + at).value == id(clock)
        and not ctypes.c_void_p.from_address(id(plain) + at).value
    ]
    _OFFSET.append(found[0] if len(found) == 1 else None)
    return _OFFSET[0]
