"""A few lines that write protobuf wire format, for the SavedModel and ONNX samples.

Messages are built as nested byte strings, field by field, so a sample reads
like the ``.proto`` it follows: ``field(7, message(field(1, node), ...))``.
Scalars are varints; strings and sub-messages are length-delimited.
"""

from __future__ import annotations

import struct

VARINT, I64, LEN, I32 = 0, 1, 2, 5


def varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # negative int64s are ten-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tag(number: int, wire: int) -> bytes:
    return varint(number << 3 | wire)


def field(number: int, value: int | str | bytes) -> bytes:
    """An int as a varint field; str (UTF-8) or bytes (a string or a message) as LEN."""
    if isinstance(value, int):
        return tag(number, VARINT) + varint(value)
    data = value.encode("utf-8") if isinstance(value, str) else value
    return tag(number, LEN) + varint(len(data)) + data


def float32(number: int, value: float) -> bytes:
    return tag(number, I32) + struct.pack("<f", value)


def message(*fields: bytes) -> bytes:
    return b"".join(fields)


def packed(number: int, values: list[int]) -> bytes:
    return field(number, b"".join(varint(v) for v in values))


def string_map(number: int, mapping: dict[str, str]) -> bytes:
    """A ``map<string, string>`` (or repeated key/value entries) field."""
    return b"".join(field(number, field(1, k) + field(2, v)) for k, v in mapping.items())
