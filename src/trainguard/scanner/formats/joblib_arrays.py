"""joblib writes numpy array bytes inside the pickle stream, right after the
BUILD of each ``NumpyArrayWrapper``.  This hook reads past them the way
``NumpyArrayWrapper.read_array`` does, so the opcodes after them are analysed
instead of being taken for a broken stream.  Object arrays are a nested pickle
at the same place, analysed by a fresh machine whose events join the outer ones.
"""

from __future__ import annotations

import math
import re

from trainguard.limits import Limits
from trainguard.scanner.picklevm.machine import (
    Built,
    Call,
    DictV,
    Global,
    LimitHit,
    Malformed,
    PickleMachine,
)

_WRAPPERS = frozenset(["joblib.numpy_pickle.NumpyArrayWrapper"])
_DTYPE = re.compile(r"^[<>|=]?([a-zA-Z])(\d*)(\[.*\])?$")
_KIND_SIZE = {"b": 1, "?": 1, "M": 8, "m": 8, "O": 0}


def _class_of(obj: object) -> str:
    if isinstance(obj, Call) and isinstance(obj.func, Global):
        return obj.func.qualname
    return ""


def _state_get(state: object, key: str) -> object:
    if isinstance(state, DictV):
        for k, v in state.items:
            if k == key:
                return v
    return None


def _itemsize(dtype: object) -> int | None:
    """Item size of a pickled ``numpy.dtype(...)``; 0 for object arrays."""
    while isinstance(dtype, Built):
        state = dtype.state
        dtype = dtype.obj
        # dtype state: (version, byteorder, subarray, names, fields, elsize, ...)
        if isinstance(state, tuple) and len(state) > 5 and isinstance(state[5], int):
            if state[5] > 0:
                return state[5]
    if not (isinstance(dtype, Call) and isinstance(dtype.args, tuple) and dtype.args):
        return None
    code = dtype.args[0]
    if not isinstance(code, str):
        return None
    m = _DTYPE.match(code)
    if not m:
        return None
    kind, digits = m.group(1), m.group(2)
    if kind == "O":
        return 0  # numpy spells object dtype "O8"; its data is a nested pickle
    if kind in _KIND_SIZE and not digits:
        return _KIND_SIZE[kind]
    if not digits:
        return None
    size = int(digits)
    return size * 4 if kind == "U" else size


class JoblibArrayHook:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def __call__(self, m: PickleMachine, built: Built) -> None:
        if _class_of(built.obj) not in _WRAPPERS:
            return
        shape = _state_get(built.state, "shape")
        itemsize = _itemsize(_state_get(built.state, "dtype"))
        if not isinstance(shape, tuple) or not all(isinstance(d, int) for d in shape):
            raise Malformed("joblib array wrapper without a readable shape")
        if itemsize is None:
            raise Malformed("joblib array wrapper with a dtype the scanner cannot size")
        if itemsize == 0:
            self._nested_object_array(m)
            return
        if _state_get(built.state, "numpy_array_alignment_bytes") is not None:
            m.s.skip(m.s.read(1)[0])
        count = math.prod(shape)
        if count < 0:
            raise Malformed("negative array dimension")
        nbytes = count * itemsize
        if nbytes > self.limits.max_member_size:
            raise LimitHit(f"joblib array of {nbytes} bytes")
        m.s.skip(nbytes)

    def _nested_object_array(self, m: PickleMachine) -> None:
        inner = PickleMachine(m.s, m.limits, m.deadline)
        inner.after_build = self
        ev = inner.run()
        outer = m.ev
        outer.globals += ev.globals
        outer.calls += ev.calls
        outer.builds += ev.builds
        outer.dynamic_globals += ev.dynamic_globals
        outer.extensions += ev.extensions
        outer.nested += ev.nested
        outer.persistent_ids += ev.persistent_ids
        if ev.limit is not None:
            raise LimitHit(f"in a joblib object array: {ev.limit}")
        if ev.end is None:
            raise Malformed(f"broken joblib object array pickle: {ev.error}")
