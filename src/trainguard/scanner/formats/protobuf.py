"""A small, bounded reader of the protobuf wire format (no protobuf dependency).

SavedModel and ONNX files are protobuf messages.  We read them without their
schemas compiled in: a :class:`Message` is a byte range whose fields are
decoded on demand, and callers name the field numbers they care about.  Only
what protobuf parsers accept is accepted (varints of at most 10 bytes, field
numbers 1..2**29-1, wire types 0, 1, 2 and 5); groups (wire types 3 and 4)
are deprecated and used by neither format, so they are rejected as malformed.
Every decoded field is counted against a per-file budget and nesting is
capped, so a crafted file costs bounded time however it is built.

The buffer may be ``bytes`` or an ``mmap`` of the file: fields hold offsets,
not copies, so a 2 GB model is walked without reading its tensors.
"""

from __future__ import annotations

import io
import mmap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from trainguard.errors import LimitExceeded, ScanError
from trainguard.limits import Limits

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
PACKABLE = 8  # in a schema: a repeated number field, one value per field or packed (LEN)
_MAX_FIELD_NUMBER = (1 << 29) - 1

Buffer = bytes | mmap.mmap


class ProtoError(ScanError):
    """The bytes are not a well-formed protobuf message."""


@dataclass(frozen=True)
class Field:
    number: int
    wire: int
    value: int  # the varint or fixed-width value; for LEN, the payload's start offset
    end: int  # for LEN, the payload's end offset; otherwise the offset after the field


class Budget:
    """Fields left to decode in one file, shared by every message of it."""

    def __init__(self, limits: Limits) -> None:
        self.max_fields = limits.max_proto_fields
        self.fields_left = limits.max_proto_fields
        self.max_depth = limits.max_proto_depth
        self.max_string = limits.max_proto_string

    def take(self) -> None:
        self.fields_left -= 1
        if self.fields_left < 0:
            raise LimitExceeded("protobuf fields decoded", self.max_fields)


def read_varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the offset after it."""
    result = 0
    for shift in range(0, 70, 7):
        if pos >= end:
            raise ProtoError(f"truncated varint at offset {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, pos
    raise ProtoError(f"varint longer than 10 bytes before offset {pos}")


def iter_fields(buf: Buffer, start: int, end: int, budget: Budget | None = None) -> Iterator[Field]:
    """Every field of the message in ``buf[start:end]``, in file order."""
    pos = start
    while pos < end:
        if budget is not None:
            budget.take()
        tag, pos = read_varint(buf, pos, end)
        number, wire = tag >> 3, tag & 7
        if not 1 <= number <= _MAX_FIELD_NUMBER:
            raise ProtoError(f"field number {number} out of range at offset {pos}")
        if wire == VARINT:
            value, pos = read_varint(buf, pos, end)
            yield Field(number, wire, value, pos)
        elif wire in (I64, I32):
            width = 8 if wire == I64 else 4
            if pos + width > end:
                raise ProtoError(f"truncated fixed{width * 8} at offset {pos}")
            value = int.from_bytes(buf[pos : pos + width], "little")
            pos += width
            yield Field(number, wire, value, pos)
        elif wire == LEN:
            length, pos = read_varint(buf, pos, end)
            if length > end - pos:
                raise ProtoError(f"field {number} runs past its message at offset {pos}")
            yield Field(number, wire, pos, pos + length)
            pos += length
        elif wire in (SGROUP, EGROUP):
            raise ProtoError(f"group (wire type {wire}) at offset {pos}: not supported")
        else:
            raise ProtoError(f"invalid wire type {wire} at offset {pos}")


class Message:
    """One message: a byte range of ``buf`` whose fields are decoded once, lazily."""

    __slots__ = ("_fields", "budget", "buf", "depth", "end", "start")

    def __init__(self, buf: Buffer, start: int, end: int, budget: Budget, depth: int = 0) -> None:
        if depth > budget.max_depth:
            raise LimitExceeded("protobuf nesting depth", budget.max_depth)
        self.buf, self.start, self.end = buf, start, end
        self.budget, self.depth = budget, depth
        self._fields: dict[int, list[Field]] | None = None

    @classmethod
    def parse(cls, buf: Buffer, limits: Limits) -> Message:
        return cls(buf, 0, len(buf), Budget(limits))

    def fields(self) -> dict[int, list[Field]]:
        if self._fields is None:
            by_number: dict[int, list[Field]] = {}
            for f in iter_fields(self.buf, self.start, self.end, self.budget):
                by_number.setdefault(f.number, []).append(f)
            self._fields = by_number
        return self._fields

    def _get(self, number: int, wire: int) -> list[Field]:
        found = self.fields().get(number, [])
        for f in found:
            if f.wire != wire:
                raise ProtoError(f"field {number} has wire type {f.wire}, expected {wire}")
        return found

    def has(self, number: int) -> bool:
        return number in self.fields()

    def varint(self, number: int, default: int = 0) -> int:
        """A scalar integer field; the last occurrence wins, as in protobuf."""
        found = self.fields().get(number, [])
        if not found:
            return default
        last = found[-1]
        if last.wire == LEN:  # a packed repeated field read as a scalar
            values = self.varints(number)
            return values[-1] if values else default
        if last.wire != VARINT:
            raise ProtoError(f"field {number} has wire type {last.wire}, expected a varint")
        return last.value

    def varints(self, number: int) -> list[int]:
        """A repeated integer field, packed or not."""
        out: list[int] = []
        for f in self.fields().get(number, []):
            if f.wire == VARINT:
                out.append(f.value)
            elif f.wire == LEN:
                pos = f.value
                while pos < f.end:
                    self.budget.take()
                    value, pos = read_varint(self.buf, pos, f.end)
                    out.append(value)
            else:
                raise ProtoError(f"field {number} has wire type {f.wire}, expected a varint")
        return out

    def raw(self, number: int) -> list[bytes]:
        """A repeated bytes field; each value cut to the budget's string cap."""
        cap = self.budget.max_string
        return [self.buf[f.value : min(f.end, f.value + cap)] for f in self._get(number, LEN)]

    def strings(self, number: int) -> list[str]:
        return [b.decode("utf-8", "replace") for b in self.raw(number)]

    def string(self, number: int, default: str = "") -> str:
        values = self.strings(number)
        return values[-1] if values else default

    def messages(self, number: int) -> Iterator[Message]:
        """Every occurrence of a message field (parsers merge repeats of a singular one)."""
        for f in self._get(number, LEN):
            yield Message(self.buf, f.value, f.end, self.budget, self.depth + 1)

    def map_entries(self, number: int) -> Iterator[tuple[str, Message]]:
        """A ``map<string, Message>`` field: (key, value) pairs."""
        for entry in self.messages(number):
            values = list(entry.messages(2))
            empty = Message(self.buf, entry.end, entry.end, self.budget, entry.depth + 1)
            yield entry.string(1), values[-1] if values else empty

    def string_map(self, number: int) -> dict[str, str]:
        """A ``map<string, string>`` or repeated key/value entry field."""
        return {e.string(1): e.string(2) for e in self.messages(number)}


# -- sniffing ----------------------------------------------------------------

# A schema maps a field number to its wire type and, for messages, the schema of
# the message (None: a scalar, string or bytes, not looked into).
Schema = Mapping[int, tuple[int, "Schema | None"]]


@dataclass(frozen=True)
class Plausibility:
    ok: bool  # nothing in the head contradicts the schema
    known: int  # fields whose number and wire type the schema expects, at any depth
    top: frozenset[int]  # field numbers seen at the top level
    first_varints: Mapping[int, int]  # top-level varint values, first occurrence


def plausible(head: bytes, schema: Schema, total_size: int | None) -> Plausibility:
    """Whether ``head``, the first bytes of a file, can start a message of ``schema``.

    Protobuf has no magic number.  A file is taken for a message when its first
    fields have the numbers and wire types the schema gives, and messages that
    run past the head are checked as far as the head goes.  Unknown field
    numbers are tolerated (parsers skip them) but give no evidence.
    """
    counter = _Counter()
    top: set[int] = set()
    firsts: dict[int, int] = {}
    size = total_size if total_size is not None else len(head)
    try:
        for f in _prefix_fields(head, 0, size):
            top.add(f.number)
            if f.wire == VARINT:
                firsts.setdefault(f.number, f.value)
            _check(head, f, schema, size, counter, 0)
    except ProtoError:
        return Plausibility(False, counter.known, frozenset(top), firsts)
    return Plausibility(True, counter.known, frozenset(top), firsts)


class _Counter:
    known = 0


def _prefix_fields(head: bytes, start: int, end: int) -> Iterator[Field]:
    """Fields of ``head[start:end]`` where ``end`` may lie past the head; stops at the head."""
    limit = min(end, len(head))
    cut = limit < end  # the head ends inside this message
    pos = start
    n = 0
    while pos < limit and n < 4096:
        n += 1
        try:
            tag, pos = read_varint(head, pos, limit)
            number, wire = tag >> 3, tag & 7
            if not 1 <= number <= _MAX_FIELD_NUMBER:
                raise ProtoError("field number out of range")
            if wire == VARINT:
                value, pos = read_varint(head, pos, limit)
                yield Field(number, wire, value, pos)
            elif wire in (I64, I32):
                pos += 8 if wire == I64 else 4
                yield Field(number, wire, 0, pos)
            elif wire == LEN:
                length, pos = read_varint(head, pos, limit)
                if pos + length > end:
                    raise ProtoError("field runs past its message")
                yield Field(number, wire, pos, pos + length)
                pos += length
            else:
                raise ProtoError(f"wire type {wire}")
        except ProtoError as exc:
            if cut and str(exc).startswith("truncated"):
                return  # the head ends inside this field: nothing more to check
            raise
    if pos > end:
        raise ProtoError("field runs past its message")


def _check(head: bytes, f: Field, schema: Schema, size: int, counter: _Counter, depth: int) -> None:
    expected = schema.get(f.number)
    if expected is None:
        return
    wire, sub = expected
    if wire == PACKABLE and f.wire in (VARINT, I64, LEN, I32):
        counter.known += 1
        return
    if f.wire != wire:
        raise ProtoError(f"field {f.number}: wire type {f.wire}, schema says {wire}")
    counter.known += 1
    if sub is None or f.wire != LEN or depth > 8:
        return
    for inner in _prefix_fields(head, f.value, f.end):
        _check(head, inner, sub, size, counter, depth + 1)


# -- reading a blob ----------------------------------------------------------


def load_buffer(f: BinaryIO, cap: int) -> Buffer:
    """The whole of ``f``: an mmap of a real file (nothing copied), else at most ``cap`` bytes."""
    try:
        fileno = f.fileno()
    except (OSError, AttributeError, io.UnsupportedOperation):
        fileno = -1
    if fileno >= 0:
        try:
            mapped = mmap.mmap(fileno, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # empty files and pipes cannot be mapped
            pass
        else:
            if hasattr(mmap, "MADV_RANDOM"):  # we hop over tensors: read ahead none of them
                mapped.madvise(mmap.MADV_RANDOM)
            return mapped
    data = f.read(cap + 1)
    if len(data) > cap:
        raise LimitExceeded("protobuf message held in memory", cap)
    return data


def close_buffer(buf: Buffer) -> None:
    if isinstance(buf, mmap.mmap):
        buf.close()
