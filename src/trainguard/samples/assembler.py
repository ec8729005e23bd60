"""A small pickle assembler, so opcode-level tricks read like what they are.

``pickle.dumps`` can only write what a real object reduces to; evasion
samples need streams no pickler would emit (memo slots overwritten, names
pushed with protocol-0 STRING, STACK_GLOBAL fed from the memo, broken tails).
Each method appends one opcode and returns the assembler, so a sample reads
as the disassembly it produces.  Stdlib only; it never unpickles anything.
"""

from __future__ import annotations

import struct
from typing import Union

# A value `push` knows how to emit without importing anything at load time.
Const = Union[
    None, bool, int, float, str, bytes, "tuple[Const, ...]", "list[Const]", "dict[str, Const]"
]


class PickleAsm:
    """Append-only opcode writer.  ``getvalue()`` returns the stream so far."""

    def __init__(self, protocol: int = 4) -> None:
        # The protocol only picks opcodes in the convenience helpers (`push`,
        # `call`); it does not emit PROTO.  Call `proto()` for that.
        self.protocol = protocol
        self._out = bytearray()

    # -- output -------------------------------------------------------------
    def getvalue(self, *, frame: bool = False) -> bytes:
        """The stream; with ``frame`` one FRAME covering everything after PROTO."""
        data = bytes(self._out)
        if not frame:
            return data
        if data[:1] != b"\x80":
            raise ValueError("framing needs the stream to start with PROTO")
        head, body = data[:2], data[2:]
        return head + b"\x95" + struct.pack("<Q", len(body)) + body

    def raw(self, data: bytes) -> PickleAsm:
        """Arbitrary bytes: garbage, a broken tail, a hand-made opcode."""
        self._out += data
        return self

    def _op(self, code: bytes, arg: bytes = b"") -> PickleAsm:
        self._out += code + arg
        return self

    # -- framing and protocol -------------------------------------------------
    def proto(self, n: int) -> PickleAsm:
        self.protocol = n
        return self._op(b"\x80", bytes([n]))

    def frame(self, length: int) -> PickleAsm:
        return self._op(b"\x95", struct.pack("<Q", length))

    def stop(self) -> PickleAsm:
        return self._op(b".")

    # -- imports --------------------------------------------------------------
    def global_(self, module: str, name: str) -> PickleAsm:
        """GLOBAL, the text form every protocol understands."""
        return self._op(b"c", f"{module}\n{name}\n".encode())

    def stack_global(self) -> PickleAsm:
        """STACK_GLOBAL: module and name are whatever strings are on the stack."""
        return self._op(b"\x93")

    def inst(self, module: str, name: str) -> PickleAsm:
        """INST: import and call with the items since MARK (protocol 0)."""
        return self._op(b"i", f"{module}\n{name}\n".encode())

    def obj(self) -> PickleAsm:
        """OBJ: call the first item after MARK with the rest (protocol 1)."""
        return self._op(b"o")

    def ext1(self, code: int) -> PickleAsm:
        """EXT1: a callable from the loading process's copyreg registry."""
        return self._op(b"\x82", bytes([code]))

    def ext2(self, code: int) -> PickleAsm:
        return self._op(b"\x83", struct.pack("<H", code))

    def ext4(self, code: int) -> PickleAsm:
        return self._op(b"\x84", struct.pack("<i", code))

    # -- strings and bytes ----------------------------------------------------
    def string(self, s: str) -> PickleAsm:
        """Protocol-0 STRING: a quoted repr-like literal, decoded by the loader."""
        return self._op(b"S", repr(s).encode("ascii", "backslashreplace") + b"\n")

    def unicode(self, s: str) -> PickleAsm:
        """Protocol-0 UNICODE (raw-unicode-escape, newline terminated)."""
        if "\n" in s or "\\" in s:
            raise ValueError("UNICODE cannot carry newlines or backslashes; use binunicode")
        return self._op(b"V", s.encode("raw_unicode_escape") + b"\n")

    def binunicode(self, s: str) -> PickleAsm:
        data = s.encode("utf-8", "surrogatepass")
        return self._op(b"X", struct.pack("<I", len(data)) + data)

    def short_binunicode(self, s: str) -> PickleAsm:
        data = s.encode("utf-8", "surrogatepass")
        if len(data) > 0xFF:
            raise ValueError("SHORT_BINUNICODE holds at most 255 bytes")
        return self._op(b"\x8c", bytes([len(data)]) + data)

    def str_(self, s: str) -> PickleAsm:
        """The string opcode a pickler of `self.protocol` would choose."""
        if self.protocol >= 4 and len(s.encode("utf-8", "surrogatepass")) <= 0xFF:
            return self.short_binunicode(s)
        if self.protocol >= 1:
            return self.binunicode(s)
        if "\n" in s or "\\" in s:
            return self.string(s)
        return self.unicode(s)

    def short_binbytes(self, b: bytes) -> PickleAsm:
        if len(b) > 0xFF:
            raise ValueError("SHORT_BINBYTES holds at most 255 bytes")
        return self._op(b"C", bytes([len(b)]) + b)

    def binbytes(self, b: bytes) -> PickleAsm:
        return self._op(b"B", struct.pack("<I", len(b)) + b)

    # -- numbers and singletons -----------------------------------------------
    def none(self) -> PickleAsm:
        return self._op(b"N")

    def bool_(self, value: bool) -> PickleAsm:
        if self.protocol >= 2:
            return self._op(b"\x88" if value else b"\x89")
        return self._op(b"I", b"01\n" if value else b"00\n")

    def int_(self, n: int) -> PickleAsm:
        """Protocol-0 INT (decimal text)."""
        return self._op(b"I", f"{n}\n".encode())

    def binint(self, n: int) -> PickleAsm:
        return self._op(b"J", struct.pack("<i", n))

    def binint1(self, n: int) -> PickleAsm:
        return self._op(b"K", bytes([n]))

    def long1(self, n: int) -> PickleAsm:
        length = (n.bit_length() + 8) // 8
        return self._op(b"\x8a", bytes([length]) + n.to_bytes(length, "little", signed=True))

    def binfloat(self, x: float) -> PickleAsm:
        return self._op(b"G", struct.pack(">d", x))

    # -- memo -----------------------------------------------------------------
    def put(self, i: int) -> PickleAsm:
        return self._op(b"p", f"{i}\n".encode())

    def get(self, i: int) -> PickleAsm:
        return self._op(b"g", f"{i}\n".encode())

    def binput(self, i: int) -> PickleAsm:
        return self._op(b"q", bytes([i]))

    def long_binput(self, i: int) -> PickleAsm:
        return self._op(b"r", struct.pack("<I", i))

    def binget(self, i: int) -> PickleAsm:
        return self._op(b"h", bytes([i]))

    def long_binget(self, i: int) -> PickleAsm:
        return self._op(b"j", struct.pack("<I", i))

    def memoize(self) -> PickleAsm:
        """MEMOIZE (protocol 4): stores the top at index len(memo)."""
        return self._op(b"\x94")

    # -- stack and containers -------------------------------------------------
    def mark(self) -> PickleAsm:
        return self._op(b"(")

    def pop(self) -> PickleAsm:
        return self._op(b"0")

    def pop_mark(self) -> PickleAsm:
        return self._op(b"1")

    def dup(self) -> PickleAsm:
        return self._op(b"2")

    def tuple_(self) -> PickleAsm:
        return self._op(b"t")

    def empty_tuple(self) -> PickleAsm:
        return self._op(b")")

    def tuple1(self) -> PickleAsm:
        return self._op(b"\x85")

    def tuple2(self) -> PickleAsm:
        return self._op(b"\x86")

    def tuple3(self) -> PickleAsm:
        return self._op(b"\x87")

    def empty_list(self) -> PickleAsm:
        return self._op(b"]")

    def list_(self) -> PickleAsm:
        return self._op(b"l")

    def append(self) -> PickleAsm:
        return self._op(b"a")

    def appends(self) -> PickleAsm:
        return self._op(b"e")

    def empty_dict(self) -> PickleAsm:
        return self._op(b"}")

    def dict_(self) -> PickleAsm:
        return self._op(b"d")

    def setitem(self) -> PickleAsm:
        return self._op(b"s")

    def setitems(self) -> PickleAsm:
        return self._op(b"u")

    # -- calls ----------------------------------------------------------------
    def reduce(self) -> PickleAsm:
        """REDUCE: pop args tuple and callable, push callable(*args)."""
        return self._op(b"R")

    def build(self) -> PickleAsm:
        """BUILD: __setstate__, or __dict__ update plus setattr of slot state."""
        return self._op(b"b")

    def newobj(self) -> PickleAsm:
        return self._op(b"\x81")

    def newobj_ex(self) -> PickleAsm:
        return self._op(b"\x92")

    def binpersid(self) -> PickleAsm:
        return self._op(b"Q")

    # -- helpers --------------------------------------------------------------
    def push(self, value: Const) -> PickleAsm:
        """Emit a plain constant with the opcodes of `self.protocol`."""
        if value is None:
            return self.none()
        if isinstance(value, bool):
            return self.bool_(value)
        if isinstance(value, int):
            if self.protocol == 0:
                return self.int_(value)
            if 0 <= value <= 0xFF:
                return self.binint1(value)
            if -(2**31) <= value < 2**31:
                return self.binint(value)
            if self.protocol >= 2:
                return self.long1(value)
            return self.int_(value)
        if isinstance(value, float):
            if self.protocol == 0:
                return self._op(b"F", f"{value!r}\n".encode())
            return self.binfloat(value)
        if isinstance(value, str):
            return self.str_(value)
        if isinstance(value, bytes):
            if self.protocol < 3:
                raise ValueError("bytes need protocol 3 or later")
            return self.short_binbytes(value) if len(value) <= 0xFF else self.binbytes(value)
        if isinstance(value, tuple):
            return self._push_tuple(value)
        if isinstance(value, list):
            if self.protocol == 0:
                self.mark()
                for item in value:
                    self.push(item)
                return self.list_()
            self.empty_list()
            if value:
                self.mark()
                for item in value:
                    self.push(item)
                self.appends()
            return self
        if isinstance(value, dict):
            if self.protocol == 0:
                self.mark()
                for key, item in value.items():
                    self.push(key)
                    self.push(item)
                return self.dict_()
            self.empty_dict()
            if value:
                self.mark()
                for key, item in value.items():
                    self.push(key)
                    self.push(item)
                self.setitems()
            return self
        raise TypeError(f"cannot push {type(value).__name__}")

    def _push_tuple(self, items: tuple[Const, ...]) -> PickleAsm:
        short = {1: self.tuple1, 2: self.tuple2, 3: self.tuple3}
        if not items and self.protocol >= 1:
            return self.empty_tuple()
        if self.protocol >= 2 and len(items) in short:
            for item in items:
                self.push(item)
            return short[len(items)]()
        self.mark()
        for item in items:
            self.push(item)
        return self.tuple_()

    def args(self, *values: Const) -> PickleAsm:
        """Push a tuple of arguments."""
        return self._push_tuple(tuple(values))

    def call(self, module: str, name: str, *values: Const) -> PickleAsm:
        """GLOBAL module.name, then REDUCE with ``values``: the classic payload."""
        return self.global_(module, name).args(*values).reduce()
