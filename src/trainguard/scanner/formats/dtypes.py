"""Is a numpy dtype pure numbers, or may its data be a pickle?

``np.load`` and ``joblib.load`` unpickle an array's data when its dtype has
objects (``dtype.hasobject``).  The scanner never builds a dtype, so it proves
the opposite from the descriptor, the way numpy would read it, and treats any
descriptor it cannot prove numeric as carrying a pickle: ``"O"``, ``"|O"``,
``"object"``, ``"object_"``, ``"i4,O"``, ``"(2,)O"``, a structured dtype with an
object field, a spelling we do not know.
"""

from __future__ import annotations

import re

# A dtype string numpy parses to plain numbers, bytes or text: one type code
# with an optional byte order, size and datetime unit.  Anything else ("object",
# "O8", "i4,O", "(2,)O", a name we do not list) may carry objects.
_NUMERIC_CODE = re.compile(
    r"[<>|=]?(?:[?bBhHiIlLqQpPnNefdgFDGSUaVc]|[biufcSUaV]\d{1,6}|[mM]8?(?:\[\d*[a-zA-Z]{1,2}\])?)"
)
_NUMERIC_NAMES = frozenset(
    (
        "bool bool8 int int8 int16 int32 int64 uint uint8 uint16 uint32 uint64 float float16 "
        "float32 float64 half single double longdouble complex complex64 complex128 str bytes "
        "datetime64 timedelta64 intc uintc intp uintp longlong ulonglong byte ubyte short ushort"
    ).split()
)


def provably_numeric(descr: object) -> bool:
    """True only when numpy's header parser would build a dtype without objects.

    Decided conservatively, as ``numpy.lib.format.descr_to_dtype`` reads the
    descriptor: a string is one dtype spelling, a tuple is ``(dtype, shape)``,
    a list holds ``(name, dtype[, shape])`` fields.  What cannot be proved
    numeric is treated as an object array, whose data np.load unpickles.
    """
    if isinstance(descr, str):
        return descr in _NUMERIC_NAMES or _NUMERIC_CODE.fullmatch(descr) is not None
    if isinstance(descr, tuple):
        return len(descr) == 2 and provably_numeric(descr[0]) and _is_shape(descr[1])
    if isinstance(descr, list):
        return bool(descr) and all(_numeric_field(f) for f in descr)
    return False


def _numeric_field(field: object) -> bool:
    if not isinstance(field, (tuple, list)) or len(field) not in (2, 3):
        return False
    if not isinstance(field[0], (str, tuple)):
        return False
    shape_ok = len(field) == 2 or _is_shape(field[2])
    return shape_ok and provably_numeric(field[1])


def _is_shape(shape: object) -> bool:
    if isinstance(shape, int):
        return True
    return isinstance(shape, tuple) and all(isinstance(d, int) for d in shape)
