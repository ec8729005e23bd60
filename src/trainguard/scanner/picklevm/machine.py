"""A symbolic pickle machine: it reads opcodes and never executes them.

It keeps the stack and memo exactly as the real unpickler would, but every
object is a symbol: an import is a :class:`Global`, a call is a :class:`Call`,
a persistent id is a :class:`PersistentRef`.  Module and name strings that an
attacker routes through the memo (BINGET/LONG_BINGET after a BINPUT overwrite)
or builds with protocol-0 string opcodes are resolved because the memo is
tracked slot for slot.  What the machine saw is returned as
:class:`PickleEvents`; deciding what is dangerous is the job of
:mod:`trainguard.scanner.picklevm.analysis`.
"""

from __future__ import annotations

import codecs
import lzma
import pickle as _P  # opcode constants only: nothing is ever unpickled
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Union

from trainguard.errors import LimitExceeded, ScanError
from trainguard.limits import DEFAULT_LIMITS, Limits
from trainguard.scanner.stream import ByteStream, Truncated


@dataclass(frozen=True)
class Global:
    module: str
    name: str
    offset: int

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class Opaque:
    """A value the machine does not keep: a long byte string, an unknown result."""

    what: str
    length: int = 0


@dataclass
class Call:
    func: Value
    args: Value
    offset: int
    kind: str  # reduce | newobj | newobj_ex | inst | obj


@dataclass
class PersistentRef:
    pid: Value
    offset: int


@dataclass
class ExtRef:
    code: int
    offset: int


@dataclass
class ListV:
    items: list[Value] = field(default_factory=list)
    dropped: int = 0


@dataclass
class DictV:
    items: list[tuple[Value, Value]] = field(default_factory=list)
    dropped: int = 0


@dataclass
class SetV:
    items: list[Value] = field(default_factory=list)
    frozen: bool = False
    dropped: int = 0


@dataclass
class Built:
    """An object after BUILD: ``obj.__setstate__(state)`` or ``__dict__.update``."""

    obj: Value
    state: Value


# Union, not |: the alias refers to itself, which | cannot spell at runtime.
Value = Union[  # noqa: UP007
    None,
    bool,
    int,
    float,
    str,
    bytes,
    tuple["Value", ...],
    Global,
    Opaque,
    Call,
    PersistentRef,
    ExtRef,
    ListV,
    DictV,
    SetV,
    Built,
]


@dataclass
class BuildEvent:
    obj: Value
    state: Value
    offset: int


@dataclass
class NestedBytes:
    """A byte string long enough to hold a pickle and starting with an opcode."""

    data: bytes  # the whole string, or its head when ``length`` says it was longer
    offset: int
    length: int = 0  # the full length when only the head was kept


@dataclass
class PickleEvents:
    """Everything security-relevant the machine saw in one pickle."""

    start: int
    end: int | None = None  # offset just past STOP; None if the stream broke
    protocol: int = 0
    globals: list[Global] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    builds: list[BuildEvent] = field(default_factory=list)
    persistent_ids: list[PersistentRef] = field(default_factory=list)
    extensions: list[ExtRef] = field(default_factory=list)
    dynamic_globals: list[tuple[int, str]] = field(default_factory=list)
    nested: list[NestedBytes] = field(default_factory=list)
    error: str | None = None  # why the stream broke
    error_offset: int | None = None
    limit: str | None = None  # a bound that stopped the analysis
    opcodes: int = 0
    result: Value = None


class Malformed(Exception):
    pass


class LimitHit(Exception):
    pass


_NESTED_MIN = 4  # "cos\n" cannot fit in fewer; the probe decides the rest
_NESTED_HEAD = 4096
_STREAM_ERRORS = (ScanError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


def _decode_long(data: bytes) -> int:
    return int.from_bytes(data, "little", signed=True) if data else 0


class PickleMachine:
    """Runs one pickle symbolically. Create a new one per pickle stream."""

    def __init__(
        self, stream: ByteStream, limits: Limits = DEFAULT_LIMITS, deadline: float | None = None
    ) -> None:
        self.s = stream
        self.limits = limits
        self.deadline = deadline
        self.stack: list[Value] = []
        self.metastack: list[list[Value]] = []
        self.memo: dict[int, Value] = {}
        self.ev = PickleEvents(start=stream.pos)
        # Called after every BUILD: joblib stores array bytes right after the
        # BUILD of its wrapper, and its hook reads past them.
        self.after_build: Callable[[PickleMachine, Built], None] | None = None

    # -- stack helpers ---------------------------------------------------
    def _push(self, v: Value) -> None:
        if len(self.stack) >= self.limits.max_stack_depth:
            raise LimitHit(f"stack depth over {self.limits.max_stack_depth}")
        self.stack.append(v)

    def _pop(self) -> Value:
        if not self.stack:
            raise Malformed("stack underflow")
        return self.stack.pop()

    def _top(self) -> Value:
        if not self.stack:
            raise Malformed("stack underflow")
        return self.stack[-1]

    def _pop_mark(self) -> list[Value]:
        if not self.metastack:
            raise Malformed("no MARK to pop to")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def _memo_put(self, idx: int, v: Value) -> None:
        if idx not in self.memo and len(self.memo) >= self.limits.max_memo_entries:
            raise LimitHit(f"memo larger than {self.limits.max_memo_entries} entries")
        self.memo[idx] = v

    def _memo_get(self, idx: int) -> Value:
        if idx not in self.memo:
            raise Malformed(f"memo slot {idx} read before it was written")
        return self.memo[idx]

    # -- argument readers ---------------------------------------------------
    def _bytes_arg(self, n: int, offset: int, *, record: bool = True) -> bytes | Opaque:
        if n < 0:
            raise Malformed("negative length")
        if n > self.limits.max_kept_bytes_arg:
            # Too long to keep, but a loader may unpickle it later: keep its head,
            # so a pickle hidden in a long byte string is still seen starting.
            head = self.s.read(min(_NESTED_HEAD, n))
            self.s.skip(n - len(head))
            if record and head[:1] in _OPCODE_BYTES:
                self.ev.nested.append(NestedBytes(head, offset, n))
            return Opaque("bytes", n)
        data = self.s.read(n)
        # Any protocol: a nested pickle.loads needs no PROTO header either; the
        # analysis asks the probe whether a loader would run it.
        if record and n >= _NESTED_MIN and data[:1] in _OPCODE_BYTES:
            self.ev.nested.append(NestedBytes(data, offset))
        return data

    def _text_arg(self, n: int, offset: int) -> str | Opaque:
        # Text is never unpickled as is (pickle.loads wants bytes); protocols 0-2
        # turn it into bytes with _codecs.encode, which the analysis follows.
        raw = self._bytes_arg(n, offset, record=False)
        if isinstance(raw, Opaque):
            return Opaque("str", n)
        try:
            return raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as exc:
            raise Malformed(f"invalid UTF-8 string: {exc}") from None

    def _line(self) -> bytes:
        return self.s.readline(self.limits.max_kept_bytes_arg)

    def _add_global(self, module: str, name: str, offset: int) -> Global:
        g = Global(module, name, offset)
        self.ev.globals.append(g)
        return g

    def _call(self, func: Value, args: Value, offset: int, kind: str) -> Call:
        c = Call(func, args, offset, kind)
        self.ev.calls.append(c)
        return c

    # -- the loop ----------------------------------------------------------------
    def run(self) -> PickleEvents:
        try:
            self._loop()
        except Truncated as exc:
            self.ev.error = f"truncated: {exc}"
            self.ev.error_offset = self.s.pos
        except Malformed as exc:
            self.ev.error = str(exc)
            self.ev.error_offset = self._op_offset
        except LimitHit as exc:
            self.ev.limit = str(exc)
            self.ev.error_offset = self._op_offset
        except LimitExceeded as exc:  # raised by a bounded decompressor below us
            self.ev.limit = str(exc)
            self.ev.error_offset = self.s.pos
        except _STREAM_ERRORS as exc:
            # The container under the pickle broke (bad deflate data, truncated
            # gzip): keep everything seen so far, report the break.
            self.ev.error = f"unreadable data: {exc}"
            self.ev.error_offset = self.s.pos
        return self.ev

    _op_offset = 0

    def _loop(self) -> None:
        s = self.s
        limit_ops = self.limits.max_pickle_opcodes
        dispatch = _DISPATCH
        while True:
            self._op_offset = s.pos
            op = s.read_byte()
            if op is None:
                raise Truncated(s.pos, 1, 0)
            self.ev.opcodes += 1
            if self.ev.opcodes & 0xFFFF == 0:
                if self.ev.opcodes > limit_ops:
                    raise LimitHit(f"more than {limit_ops} opcodes")
                if self.deadline is not None and time.monotonic() > self.deadline:
                    raise LimitHit("time limit for this file reached")
            handler = dispatch.get(op)
            if handler is None:
                raise Malformed(f"invalid opcode 0x{op:02x}")
            if handler(self, self._op_offset):
                self.ev.end = s.pos
                return


# Each handler returns True only for STOP.  They are plain functions in a table
# rather than methods looked up by name, which keeps the hot loop cheap.
Handler = Callable[[PickleMachine, int], bool | None]


def _op_proto(m: PickleMachine, off: int) -> None:
    m.ev.protocol = m.s.read(1)[0]


def _op_frame(m: PickleMachine, off: int) -> None:
    m.s.read(8)  # frame length: a hint for buffering, not structure


def _op_stop(m: PickleMachine, off: int) -> bool:
    m.ev.result = m._pop() if m.stack else None
    return True


def _op_mark(m: PickleMachine, off: int) -> None:
    if len(m.metastack) >= m.limits.max_stack_depth:
        raise LimitHit(f"MARK nesting over {m.limits.max_stack_depth}")
    m.metastack.append(m.stack)
    m.stack = []


def _op_pop(m: PickleMachine, off: int) -> None:
    if m.stack:
        m.stack.pop()
    else:
        m._pop_mark()


def _op_pop_mark(m: PickleMachine, off: int) -> None:
    m._pop_mark()


def _op_dup(m: PickleMachine, off: int) -> None:
    m._push(m._top())


def _push_const(value: Value) -> Handler:
    def handler(m: PickleMachine, off: int) -> None:
        m._push(value)

    return handler


def _int_literal(text: bytes) -> int:
    """An INT/LONG argument read as the C unpickler reads it (base 0, then strtol's octal)."""
    try:
        return int(text, 0)
    except ValueError:
        # strtol with base 0 also takes "010" (octal), which int(..., 0) refuses.
        stripped = text.strip()
        digits = stripped.lstrip(b"+-")
        if len(stripped) - len(digits) <= 1 and digits[:1] == b"0" and digits.isdigit():
            value = int(digits, 8)
            return -value if stripped[:1] == b"-" else value
        raise Malformed("bad INT literal") from None


def _op_int(m: PickleMachine, off: int) -> None:
    line = m._line()
    if line in (b"00", b"01"):
        m._push(line == b"01")
        return
    m._push(_int_literal(line) if len(line) <= 64 else Opaque("int", len(line)))


def _op_long(m: PickleMachine, off: int) -> None:
    line = m._line()
    line = line[:-1] if line.endswith(b"L") else line
    m._push(_int_literal(line) if len(line) <= 64 else Opaque("int", len(line)))


def _op_binint(m: PickleMachine, off: int) -> None:
    m._push(struct.unpack("<i", m.s.read(4))[0])


def _op_binint1(m: PickleMachine, off: int) -> None:
    m._push(m.s.read(1)[0])


def _op_binint2(m: PickleMachine, off: int) -> None:
    m._push(struct.unpack("<H", m.s.read(2))[0])


def _op_long1(m: PickleMachine, off: int) -> None:
    m._push(_decode_long(m.s.read(m.s.read(1)[0])))


def _op_long4(m: PickleMachine, off: int) -> None:
    n = struct.unpack("<i", m.s.read(4))[0]
    if n < 0:
        raise Malformed("negative LONG4 length")
    if n > 64:
        m.s.skip(n)
        m._push(Opaque("int", n))
    else:
        m._push(_decode_long(m.s.read(n)))


def _op_float(m: PickleMachine, off: int) -> None:
    try:
        m._push(float(m._line()[:64]))
    except ValueError:
        raise Malformed("bad FLOAT literal") from None


def _op_binfloat(m: PickleMachine, off: int) -> None:
    m._push(struct.unpack(">d", m.s.read(8))[0])


def _op_string(m: PickleMachine, off: int) -> None:
    # Protocol 0 STRING: a quoted Python bytes literal. Decoded by hand (no eval).
    line = m._line()
    if len(line) < 2 or line[:1] != line[-1:] or line[:1] not in (b"'", b'"'):
        raise Malformed("STRING argument is not quoted")
    try:
        data = codecs.escape_decode(line[1:-1])[0]
    except ValueError:
        raise Malformed("bad escape in STRING") from None
    m._push(_str_or_bytes(data))


def _str_or_bytes(data: bytes) -> Value:
    # Python 3 loads protocol 0-2 STRINGs as str (encoding="ASCII" by default);
    # modules and names built from them are strings, so keep them as text.
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        return data


def _binstring(m: PickleMachine, raw: bytes | Opaque, off: int) -> Value:
    """A protocol 0-2 string: text when ASCII, else bytes that a loader may unpickle."""
    if isinstance(raw, Opaque):
        return raw
    value = _str_or_bytes(raw)
    if isinstance(value, bytes) and len(value) >= _NESTED_MIN and value[:1] in _OPCODE_BYTES:
        m.ev.nested.append(NestedBytes(value, off))
    return value


def _op_binstring(m: PickleMachine, off: int) -> None:
    n = struct.unpack("<i", m.s.read(4))[0]
    m._push(_binstring(m, m._bytes_arg(n, off, record=False), off))


def _op_short_binstring(m: PickleMachine, off: int) -> None:
    m._push(_binstring(m, m._bytes_arg(m.s.read(1)[0], off, record=False), off))


def _op_binbytes(m: PickleMachine, off: int) -> None:
    m._push(m._bytes_arg(struct.unpack("<I", m.s.read(4))[0], off))


def _op_short_binbytes(m: PickleMachine, off: int) -> None:
    m._push(m._bytes_arg(m.s.read(1)[0], off))


def _op_binbytes8(m: PickleMachine, off: int) -> None:
    m._push(m._bytes_arg(struct.unpack("<Q", m.s.read(8))[0], off))


def _op_bytearray8(m: PickleMachine, off: int) -> None:
    m._push(m._bytes_arg(struct.unpack("<Q", m.s.read(8))[0], off))


def _op_unicode(m: PickleMachine, off: int) -> None:
    try:
        m._push(m._line().decode("raw-unicode-escape"))
    except UnicodeDecodeError:
        raise Malformed("bad UNICODE literal") from None


def _op_short_binunicode(m: PickleMachine, off: int) -> None:
    m._push(m._text_arg(m.s.read(1)[0], off))


def _op_binunicode(m: PickleMachine, off: int) -> None:
    m._push(m._text_arg(struct.unpack("<I", m.s.read(4))[0], off))


def _op_binunicode8(m: PickleMachine, off: int) -> None:
    m._push(m._text_arg(struct.unpack("<Q", m.s.read(8))[0], off))


def _op_next_buffer(m: PickleMachine, off: int) -> None:
    m._push(Opaque("out-of-band buffer"))


def _op_readonly_buffer(m: PickleMachine, off: int) -> None:
    m._top()


def _op_empty_list(m: PickleMachine, off: int) -> None:
    m._push(ListV())


def _op_empty_dict(m: PickleMachine, off: int) -> None:
    m._push(DictV())


def _op_empty_set(m: PickleMachine, off: int) -> None:
    m._push(SetV())


def _op_empty_tuple(m: PickleMachine, off: int) -> None:
    m._push(())


def _keep(m: PickleMachine, items: list[Value]) -> tuple[list[Value], int]:
    cap = m.limits.max_kept_container_items
    return (items[:cap], max(len(items) - cap, 0))


def _op_list(m: PickleMachine, off: int) -> None:
    kept, dropped = _keep(m, m._pop_mark())
    m._push(ListV(kept, dropped))


def _op_tuple(m: PickleMachine, off: int) -> None:
    m._push(tuple(m._pop_mark()))


def _tuple_n(n: int) -> Handler:
    def handler(m: PickleMachine, off: int) -> None:
        items = [m._pop() for _ in range(n)]
        items.reverse()
        m._push(tuple(items))

    return handler


def _op_dict(m: PickleMachine, off: int) -> None:
    items = m._pop_mark()
    if len(items) % 2:
        raise Malformed("DICT with an odd number of items")
    d = DictV()
    _dict_add(m, d, items)
    m._push(d)


def _dict_add(m: PickleMachine, d: DictV, items: list[Value]) -> None:
    cap = m.limits.max_kept_container_items
    for i in range(0, len(items) - 1, 2):
        if len(d.items) < cap:
            d.items.append((items[i], items[i + 1]))
        else:
            d.dropped += 1


# Values whose append/__setitem__/add may be real methods: an APPEND, SETITEM or
# ADDITEMS on them is a call, never a reason to stop reading.
_HAS_METHODS = (Call, Built, Opaque, PersistentRef, Global, ExtRef)


def _list_add(m: PickleMachine, target: Value, items: list[Value]) -> None:
    if isinstance(target, ListV):
        room = m.limits.max_kept_container_items - len(target.items)
        target.items.extend(items[: max(room, 0)])
        target.dropped += max(len(items) - max(room, 0), 0)
    elif isinstance(target, SetV):
        target.items.extend(items[: m.limits.max_kept_container_items])
    # APPEND on anything else calls its append/extend method: a call in effect
    # (an imported object's method included).  Built-in values have none: the
    # real unpickler fails there too.
    elif not isinstance(target, _HAS_METHODS):
        raise Malformed("APPEND to a value that is not a list")
    else:
        m._call(Opaque("append method"), (target, *items[:4]), m._op_offset, "append")


def _op_append(m: PickleMachine, off: int) -> None:
    v = m._pop()
    _list_add(m, m._top(), [v])


def _op_appends(m: PickleMachine, off: int) -> None:
    items = m._pop_mark()
    _list_add(m, m._top(), items)


def _op_setitem(m: PickleMachine, off: int) -> None:
    v = m._pop()
    k = m._pop()
    _setitems(m, [k, v])


def _op_setitems(m: PickleMachine, off: int) -> None:
    items = m._pop_mark()
    if len(items) % 2:
        raise Malformed("SETITEMS with an odd number of items")
    _setitems(m, items)


def _setitems(m: PickleMachine, items: list[Value]) -> None:
    target = m._top()
    if isinstance(target, DictV):
        _dict_add(m, target, items)
    elif isinstance(target, ListV):
        pass  # list[index] = value: the real unpickler carries on when the index fits
    elif isinstance(target, _HAS_METHODS):
        # __setitem__ on a constructed object: real code runs (CVE-2026-24747
        # abused exactly this on tensors).
        m._call(Opaque("__setitem__ method"), (target, *items[:4]), m._op_offset, "setitem")
    else:
        raise Malformed("SETITEM on a value that is not a dict")


def _op_additems(m: PickleMachine, off: int) -> None:
    items = m._pop_mark()
    target = m._top()
    if isinstance(target, SetV):
        target.items.extend(items[: m.limits.max_kept_container_items])
    elif isinstance(target, _HAS_METHODS):
        m._call(Opaque("add method"), (target, *items[:4]), off, "additems")
    else:
        raise Malformed("ADDITEMS on a value that is not a set")


def _op_frozenset(m: PickleMachine, off: int) -> None:
    items = m._pop_mark()
    m._push(SetV(items[: m.limits.max_kept_container_items], frozen=True))


def _op_get(m: PickleMachine, off: int) -> None:
    try:
        idx = int(m._line())
    except ValueError:
        raise Malformed("bad GET index") from None
    m._push(m._memo_get(idx))


def _op_binget(m: PickleMachine, off: int) -> None:
    m._push(m._memo_get(m.s.read(1)[0]))


def _op_long_binget(m: PickleMachine, off: int) -> None:
    m._push(m._memo_get(struct.unpack("<I", m.s.read(4))[0]))


def _op_put(m: PickleMachine, off: int) -> None:
    try:
        idx = int(m._line())
    except ValueError:
        raise Malformed("bad PUT index") from None
    if idx < 0:
        raise Malformed("negative PUT index")
    m._memo_put(idx, m._top())


def _op_binput(m: PickleMachine, off: int) -> None:
    m._memo_put(m.s.read(1)[0], m._top())


def _op_long_binput(m: PickleMachine, off: int) -> None:
    m._memo_put(struct.unpack("<I", m.s.read(4))[0], m._top())


def _op_memoize(m: PickleMachine, off: int) -> None:
    m._memo_put(len(m.memo), m._top())


def _name_line(m: PickleMachine) -> str:
    raw = m._line()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("module or name is not UTF-8") from None


def _op_global(m: PickleMachine, off: int) -> None:
    module = _name_line(m)
    name = _name_line(m)
    m._push(m._add_global(module, name, off))


def _op_stack_global(m: PickleMachine, off: int) -> None:
    name = m._pop()
    module = m._pop()
    if isinstance(module, str) and isinstance(name, str):
        m._push(m._add_global(module, name, off))
        return
    # The real unpickler requires str operands; anything else either fails to
    # load or was computed at load time. Either way it is not a plain import.
    m.ev.dynamic_globals.append((off, f"{_short(module)}.{_short(name)}"))
    m._push(Opaque("dynamic global"))


def _op_inst(m: PickleMachine, off: int) -> None:
    module = _name_line(m)
    name = _name_line(m)
    cls = m._add_global(module, name, off)
    args = tuple(m._pop_mark())
    m._push(m._call(cls, args, off, "inst"))


def _op_obj(m: PickleMachine, off: int) -> None:
    items = m._pop_mark()
    if not items:
        raise Malformed("OBJ without a class")
    m._push(m._call(items[0], tuple(items[1:]), off, "obj"))


def _op_reduce(m: PickleMachine, off: int) -> None:
    args = m._pop()
    func = m._pop()
    m._push(m._call(func, args, off, "reduce"))


def _op_newobj(m: PickleMachine, off: int) -> None:
    args = m._pop()
    cls = m._pop()
    m._push(m._call(cls, args, off, "newobj"))


def _op_newobj_ex(m: PickleMachine, off: int) -> None:
    kwargs = m._pop()
    args = m._pop()
    cls = m._pop()
    m._push(m._call(cls, (args, kwargs), off, "newobj_ex"))


def _op_build(m: PickleMachine, off: int) -> None:
    state = m._pop()
    obj = m._pop()
    m.ev.builds.append(BuildEvent(obj, state, off))
    built = Built(obj, state)
    m._push(built)
    if m.after_build is not None:
        m.after_build(m, built)


def _op_persid(m: PickleMachine, off: int) -> None:
    try:
        pid: Value = m._line().decode("ascii")
    except UnicodeDecodeError:
        raise Malformed("PERSID is not ASCII") from None
    ref = PersistentRef(pid, off)
    m.ev.persistent_ids.append(ref)
    m._push(ref)


def _op_binpersid(m: PickleMachine, off: int) -> None:
    ref = PersistentRef(m._pop(), off)
    m.ev.persistent_ids.append(ref)
    m._push(ref)


def _ext(size: int) -> Handler:
    fmt = {1: "<B", 2: "<H", 4: "<i"}[size]

    def handler(m: PickleMachine, off: int) -> None:
        code = struct.unpack(fmt, m.s.read(size))[0]
        ref = ExtRef(code, off)
        m.ev.extensions.append(ref)
        m._push(ref)

    return handler


def _short(v: Value, width: int = 60) -> str:
    text = describe(v)
    return text if len(text) <= width else text[: width - 3] + "..."


def describe(v: Value, depth: int = 0) -> str:
    """A short, bounded, human-readable rendering of a symbolic value."""
    if depth > 4:
        return "..."
    if isinstance(v, Global):
        return v.qualname
    if isinstance(v, Call):
        return f"{describe(v.func, depth + 1)}{_describe_args(v.args, depth)}"
    if isinstance(v, Built):
        return f"{describe(v.obj, depth + 1)}.__setstate__({describe(v.state, depth + 1)})"
    if isinstance(v, PersistentRef):
        return f"persistent_load({describe(v.pid, depth + 1)})"
    if isinstance(v, ExtRef):
        return f"<extension {v.code}>"
    if isinstance(v, Opaque):
        return f"<{v.what}{f' of {v.length} bytes' if v.length else ''}>"
    if isinstance(v, ListV):
        return (
            "["
            + ", ".join(describe(i, depth + 1) for i in v.items[:6])
            + (", ..." if len(v.items) > 6 or v.dropped else "")
            + "]"
        )
    if isinstance(v, SetV):
        return "{" + ", ".join(describe(i, depth + 1) for i in v.items[:6]) + "}"
    if isinstance(v, DictV):
        body = ", ".join(
            f"{describe(k, depth + 1)}: {describe(x, depth + 1)}" for k, x in v.items[:6]
        )
        return "{" + body + (", ..." if len(v.items) > 6 or v.dropped else "") + "}"
    if isinstance(v, tuple):
        inner = ", ".join(describe(i, depth + 1) for i in v[:6])
        return f"({inner}{', ...' if len(v) > 6 else ''}{',' if len(v) == 1 else ''})"
    if isinstance(v, (bytes, str)):
        r = repr(v)
        return r if len(r) <= 120 else r[:117] + "..."
    return repr(v)


def _describe_args(args: Value, depth: int) -> str:
    if isinstance(args, tuple):
        return "(" + ", ".join(describe(a, depth + 1) for a in args[:6]) + ")"
    return f"(*{describe(args, depth + 1)})"


_DISPATCH: dict[int, Handler] = {
    _P.PROTO[0]: _op_proto,
    _P.FRAME[0]: _op_frame,
    _P.STOP[0]: _op_stop,
    _P.MARK[0]: _op_mark,
    _P.POP[0]: _op_pop,
    _P.POP_MARK[0]: _op_pop_mark,
    _P.DUP[0]: _op_dup,
    _P.NONE[0]: _push_const(None),
    _P.NEWTRUE[0]: _push_const(True),
    _P.NEWFALSE[0]: _push_const(False),
    _P.INT[0]: _op_int,
    _P.LONG[0]: _op_long,
    _P.BININT[0]: _op_binint,
    _P.BININT1[0]: _op_binint1,
    _P.BININT2[0]: _op_binint2,
    _P.LONG1[0]: _op_long1,
    _P.LONG4[0]: _op_long4,
    _P.FLOAT[0]: _op_float,
    _P.BINFLOAT[0]: _op_binfloat,
    _P.STRING[0]: _op_string,
    _P.BINSTRING[0]: _op_binstring,
    _P.SHORT_BINSTRING[0]: _op_short_binstring,
    _P.BINBYTES[0]: _op_binbytes,
    _P.SHORT_BINBYTES[0]: _op_short_binbytes,
    _P.BINBYTES8[0]: _op_binbytes8,
    _P.BYTEARRAY8[0]: _op_bytearray8,
    _P.UNICODE[0]: _op_unicode,
    _P.SHORT_BINUNICODE[0]: _op_short_binunicode,
    _P.BINUNICODE[0]: _op_binunicode,
    _P.BINUNICODE8[0]: _op_binunicode8,
    _P.NEXT_BUFFER[0]: _op_next_buffer,
    _P.READONLY_BUFFER[0]: _op_readonly_buffer,
    _P.EMPTY_LIST[0]: _op_empty_list,
    _P.EMPTY_DICT[0]: _op_empty_dict,
    _P.EMPTY_SET[0]: _op_empty_set,
    _P.EMPTY_TUPLE[0]: _op_empty_tuple,
    _P.LIST[0]: _op_list,
    _P.TUPLE[0]: _op_tuple,
    _P.TUPLE1[0]: _tuple_n(1),
    _P.TUPLE2[0]: _tuple_n(2),
    _P.TUPLE3[0]: _tuple_n(3),
    _P.DICT[0]: _op_dict,
    _P.APPEND[0]: _op_append,
    _P.APPENDS[0]: _op_appends,
    _P.SETITEM[0]: _op_setitem,
    _P.SETITEMS[0]: _op_setitems,
    _P.ADDITEMS[0]: _op_additems,
    _P.FROZENSET[0]: _op_frozenset,
    _P.GET[0]: _op_get,
    _P.BINGET[0]: _op_binget,
    _P.LONG_BINGET[0]: _op_long_binget,
    _P.PUT[0]: _op_put,
    _P.BINPUT[0]: _op_binput,
    _P.LONG_BINPUT[0]: _op_long_binput,
    _P.MEMOIZE[0]: _op_memoize,
    _P.GLOBAL[0]: _op_global,
    _P.STACK_GLOBAL[0]: _op_stack_global,
    _P.INST[0]: _op_inst,
    _P.OBJ[0]: _op_obj,
    _P.REDUCE[0]: _op_reduce,
    _P.NEWOBJ[0]: _op_newobj,
    _P.NEWOBJ_EX[0]: _op_newobj_ex,
    _P.BUILD[0]: _op_build,
    _P.PERSID[0]: _op_persid,
    _P.BINPERSID[0]: _op_binpersid,
    _P.EXT1[0]: _ext(1),
    _P.EXT2[0]: _ext(2),
    _P.EXT4[0]: _ext(4),
}


_OPCODE_BYTES = frozenset(bytes([op]) for op in _DISPATCH)


def run_pickle(
    stream: ByteStream, limits: Limits = DEFAULT_LIMITS, deadline: float | None = None
) -> PickleEvents:
    """Analyse one pickle starting at the stream's position."""
    return PickleMachine(stream, limits, deadline).run()
