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
from trainguard.scanner.formats.dtypes import provably_numeric
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
_KIND_SIZE = {"b": 1, "?": 1, "M": 8, "m": 8}


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


_NPY_ITEM_REFCOUNT = 0x01  # dtype flag: the items are Python objects


def _dtype_parts(dtype: object) -> tuple[str | None, object]:
    """The code string passed to ``numpy.dtype(...)`` and the state BUILD gave it."""
    state: object = None
    while isinstance(dtype, Built):
        state = dtype.state if state is None else state
        dtype = dtype.obj
    if isinstance(dtype, Call) and isinstance(dtype.args, tuple) and dtype.args:
        code = dtype.args[0]
        return (code if isinstance(code, str) else None), state
    return None, state


def may_hold_objects(dtype: object, depth: int = 0) -> bool:
    """False only when the pickled dtype is provably numbers (``hasobject`` is False).

    numpy rebuilds a dtype from its code and then its state (version, byte
    order, subarray, names, fields, item size, alignment, flags): the state can
    add fields or the object flag to a harmless-looking code, so both are read.
    """
    code, state = _dtype_parts(dtype)
    if code is None or depth > 8 or not provably_numeric(code):
        return True
    if state is None:
        return False
    if not isinstance(state, tuple) or len(state) < 8:
        return True
    flags, subarray, fields = state[7], state[2], state[4]
    if not isinstance(flags, int) or flags & _NPY_ITEM_REFCOUNT:
        return True
    if subarray is not None:
        if not (isinstance(subarray, tuple) and subarray):
            return True
        if may_hold_objects(subarray[0], depth + 1):
            return True
    if fields is not None:
        if not isinstance(fields, DictV) or fields.dropped:
            return True
        for _name, spec in fields.items:
            if not (isinstance(spec, tuple) and spec) or may_hold_objects(spec[0], depth + 1):
                return True
    return False


def _itemsize(dtype: object) -> int | None:
    """Item size of a pickled ``numpy.dtype(...)``; 0 when its data is a pickle."""
    if may_hold_objects(dtype):
        return 0  # joblib pickles object arrays' data right here: a nested pickle
    code, state = _dtype_parts(dtype)
    if isinstance(state, tuple) and len(state) > 5 and isinstance(state[5], int):
        if state[5] > 0:
            return state[5]
    m = _DTYPE.match(code or "")
    if not m:
        return None
    kind, digits = m.group(1), m.group(2)
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
