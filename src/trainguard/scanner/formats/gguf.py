"""GGUF (llama.cpp's model format): header, key-value metadata, tensor table.

The tables are parsed with a cap on every count, length and nesting level
(``trainguard/limits.py``) and checked against what llama.cpp's ``gguf.cpp``
enforces; tensor data is never read, only its offsets and sizes are checked
against the file.  Chat templates found in the metadata go to
:mod:`trainguard.scanner.formats.templates`, other strings to the code-like check.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from trainguard.errors import LimitExceeded
from trainguard.findings import Finding
from trainguard.limits import Limits
from trainguard.rules import finding
from trainguard.scanner.base import Blob, ScanContext
from trainguard.scanner.formats.templates import is_template_key, template_findings

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: names must be shorter
MAX_KEY = 65535  # the spec's limit on key length

# Value types: fixed-size scalars by struct code; 8 is a string, 9 an array.
_SCALARS: dict[int, str] = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_STRING, _ARRAY, _UINT32 = 8, 9, 4

# ggml tensor types: (elements per block, bytes per block), as in gguf-py's
# GGML_QUANT_SIZES.  Numbers missing here were removed from ggml or are newer.
GGML_TYPES: dict[int, tuple[int, int]] = {
    0: (1, 4),
    1: (1, 2),
    2: (32, 18),
    3: (32, 20),
    6: (32, 22),
    7: (32, 24),
    8: (32, 34),
    9: (32, 40),
    10: (256, 84),
    11: (256, 110),
    12: (256, 144),
    13: (256, 176),
    14: (256, 210),
    15: (256, 292),
    16: (256, 66),
    17: (256, 74),
    18: (256, 98),
    19: (256, 50),
    20: (32, 18),
    21: (256, 110),
    22: (256, 82),
    23: (256, 136),
    24: (1, 1),
    25: (1, 2),
    26: (1, 4),
    27: (1, 8),
    28: (1, 8),
    29: (256, 56),
    30: (1, 2),
    34: (256, 54),
    35: (256, 66),
    39: (32, 17),
    40: (64, 36),
    41: (128, 18),
}
_MAX_FINDINGS = 20  # per kind of structural problem
_CHUNK = 1 << 20


class _Malformed(Exception):
    """The tables cannot be read further; the message says why."""


class _Cursor:
    """Sequential reads over untrusted bytes, bounded by ``limit`` and by time."""

    def __init__(self, f: BinaryIO, limits: Limits, deadline: float | None, endian: str) -> None:
        self.f = f
        self.limit = limits.max_gguf_metadata
        self.seconds = limits.max_seconds_per_file
        self.deadline = deadline
        self.e = endian
        self.pos = 0
        self._buf = b""
        self._at = 0
        self._ticks = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > self.limit:
            raise LimitExceeded("GGUF metadata size", self.limit)
        avail = len(self._buf) - self._at
        if avail < n:
            more = self.f.read(max(n - avail, _CHUNK))
            self._buf = self._buf[self._at :] + more
            self._at = 0
            if len(self._buf) < n:
                raise _Malformed(
                    f"file ends at byte {self.pos + len(self._buf)} while "
                    f"reading {n} bytes at {self.pos}"
                )
        out = self._buf[self._at : self._at + n]
        self._at += n
        self.pos += n
        return out

    def skip(self, n: int) -> None:
        while n > 0:
            step = min(n, _CHUNK)
            self.take(step)
            n -= step

    def unpack(self, code: str) -> int:
        value: int = struct.unpack(self.e + code, self.take(struct.calcsize(code)))[0]
        return value

    def tick(self) -> None:
        self._ticks += 1
        if self._ticks % 4096 == 0 and self.deadline is not None:
            if time.monotonic() > self.deadline:
                raise LimitExceeded("time spent reading the GGUF tables", self.seconds)


@dataclass
class _Tensor:
    name: str
    dims: list[int]
    ggml_type: int
    offset: int
    at: int  # where its entry starts in the file


@dataclass
class _Tables:
    version: int = 0
    alignment: int = DEFAULT_ALIGNMENT
    strings: list[tuple[str, str, int]] = field(default_factory=list)  # key, value, offset
    tensors: list[_Tensor] = field(default_factory=list)
    end: int = 0  # end of the tensor table


class GgufFormat:
    name = "gguf"

    def sniff(self, head: bytes, blob: Blob) -> bool:
        return head[:4] == MAGIC

    def scan(self, ctx: ScanContext, blob: Blob) -> Iterator[Finding]:
        # Imported on use, like every parser a format needs only for its own files.
        from trainguard.scanner.formats import codelike

        tables = _Tables()
        problems: list[Finding] = []
        with blob.open() as f:
            try:
                _read_tables(f, ctx, tables, problems)
            except _Malformed as exc:
                problems.append(_finding("TG911", str(exc)))
            except LimitExceeded as exc:
                problems.append(_finding("TG002", f"GGUF tables: {exc}"))
        yield from _capped(problems)
        for key, value, offset in tables.strings:
            if is_template_key(key):
                yield from template_findings(value, ctx.limits, key, offset=offset)
            elif (what := codelike.code_like(value)) is not None:
                yield _finding(
                    "TG914",
                    f"metadata {key!r} holds {what[0]}",
                    offset,
                    trigger=key,
                    evidence={"excerpt": what[1]},
                )
        if tables.end:  # the tensor table was read to its end
            yield from _capped(list(_check_layout(tables, blob.size)))


def _finding(
    rule_id: str,
    message: str,
    offset: int | None = None,
    *,
    trigger: str = "",
    evidence: dict[str, str] | None = None,
) -> Finding:
    return finding(
        rule_id,
        message,
        offset=offset,
        trigger=trigger,
        evidence=evidence or {},
    )


def _capped(findings: list[Finding]) -> Iterator[Finding]:
    per_rule: dict[str, int] = {}
    for f in findings:
        per_rule[f.rule] = per_rule.get(f.rule, 0) + 1
        if per_rule[f.rule] <= _MAX_FINDINGS:
            yield f
    for rule_id, n in per_rule.items():
        if n > _MAX_FINDINGS:
            yield _finding(rule_id, f"{n - _MAX_FINDINGS} more such problems not listed")


def _read_tables(f: BinaryIO, ctx: ScanContext, t: _Tables, problems: list[Finding]) -> None:
    limits = ctx.limits
    head = f.read(8)
    if len(head) < 8:
        raise _Malformed("file ends inside the GGUF header")
    endian = "<"
    t.version = struct.unpack("<I", head[4:8])[0]
    if t.version & 0xFFFF == 0 and t.version:  # a big-endian file (GGUF v3 allows them)
        endian, t.version = ">", struct.unpack(">I", head[4:8])[0]
    if t.version not in (2, 3):
        raise _Malformed(
            f"GGUF version {t.version} is not 2 or 3; llama.cpp refuses it "
            "and its tables were not read"
        )
    cur = _Cursor(f, limits, ctx.deadline, endian)
    cur.pos = 8
    n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
    if n_kv > limits.max_gguf_kv_count:
        raise LimitExceeded(f"{n_kv:,} metadata entries", limits.max_gguf_kv_count)
    if n_tensors > limits.max_gguf_tensor_count:
        raise LimitExceeded(f"{n_tensors:,} tensors", limits.max_gguf_tensor_count)
    keys: set[str] = set()
    for _ in range(n_kv):
        at = cur.pos
        key = _string(cur, limits, MAX_KEY, "key")
        if not key:
            problems.append(_finding("TG911", "empty metadata key", at))
        if key in keys:
            problems.append(
                _finding("TG912", f"metadata key {key!r} appears twice", at, trigger=key)
            )
        keys.add(key)
        vtype = cur.unpack("I")
        value_at = cur.pos
        value = _value(cur, limits, vtype, key, 0, problems)
        if vtype == _STRING and isinstance(value, str):
            t.strings.append((key, value, value_at))
        if key == "general.alignment":
            if vtype != _UINT32 or not isinstance(value, int) or value <= 0 or value & (value - 1):
                raise _Malformed(
                    f"general.alignment must be a power-of-two uint32, got "
                    f"{value!r} of type {vtype}"
                )
            t.alignment = value
    names: set[str] = set()
    for _ in range(n_tensors):
        at = cur.pos
        name = _string(cur, limits, MAX_KEY, "tensor name")
        if len(name.encode("utf-8", "surrogateescape")) >= MAX_NAME:
            problems.append(
                _finding(
                    "TG911",
                    f"tensor name of {len(name)} characters is longer than ggml's {MAX_NAME - 1}",
                    at,
                )
            )
        if name in names:
            problems.append(_finding("TG912", f"tensor {name!r} appears twice", at, trigger=name))
        names.add(name)
        n_dims = cur.unpack("I")
        if n_dims > MAX_DIMS:
            raise _Malformed(f"tensor {name!r} has {n_dims} dimensions; ggml allows {MAX_DIMS}")
        dims = [cur.unpack("q") for _ in range(n_dims)]
        t.tensors.append(_Tensor(name, dims, cur.unpack("I"), cur.unpack("Q"), at))
        cur.tick()
    t.end = cur.pos


def _string(cur: _Cursor, limits: Limits, cap: int, what: str) -> str:
    at = cur.pos
    n = cur.unpack("Q")
    if n > cap:
        if cap < limits.max_gguf_string:
            raise _Malformed(f"{what} of {n:,} bytes at byte {at} exceeds the format's {cap:,}")
        raise LimitExceeded(f"{what} of {n:,} bytes at byte {at}", cap)
    cur.tick()
    return cur.take(n).decode("utf-8", "surrogateescape")


def _value(
    cur: _Cursor, limits: Limits, vtype: int, key: str, depth: int, problems: list[Finding]
) -> object:
    """The value when it is a scalar or a string; arrays are walked and skipped."""
    if vtype in _SCALARS:
        code = _SCALARS[vtype]
        scalar: object = struct.unpack(cur.e + code, cur.take(struct.calcsize(code)))[0]
        return scalar
    if vtype == _STRING:
        return _string(cur, limits, limits.max_gguf_string, f"string value of {key!r}")
    if vtype != _ARRAY:
        raise _Malformed(f"metadata {key!r} has unknown value type {vtype}")
    at = cur.pos
    item_type, count = cur.unpack("I"), cur.unpack("Q")
    if count > limits.max_gguf_array_items:
        raise LimitExceeded(f"array {key!r} of {count:,} items", limits.max_gguf_array_items)
    if item_type in _SCALARS:
        cur.skip(count * struct.calcsize(_SCALARS[item_type]))
    elif item_type == _STRING:
        for _ in range(count):
            _string(cur, limits, limits.max_gguf_string, f"string in array {key!r}")
    elif item_type == _ARRAY:
        if depth + 1 >= limits.max_gguf_array_depth:
            raise LimitExceeded(f"arrays nested in {key!r}", limits.max_gguf_array_depth)
        if depth == 0:
            problems.append(
                _finding(
                    "TG913",
                    f"metadata {key!r} is an array of arrays, which llama.cpp refuses",
                    at,
                    trigger=key,
                )
            )
        for _ in range(count):
            _value(cur, limits, _ARRAY, key, depth + 1, problems)
            cur.tick()
    else:
        raise _Malformed(f"array {key!r} has unknown item type {item_type}")
    return None


def _check_layout(t: _Tables, file_size: int | None) -> Iterator[Finding]:
    align = t.alignment
    data_start = -(-t.end // align) * align
    placed: list[tuple[int, int, _Tensor]] = []
    for tensor in t.tensors:
        where = tensor.at
        if any(d < 0 for d in tensor.dims):
            yield _finding(
                "TG911", f"tensor {tensor.name!r} has a negative dimension {tensor.dims}", where
            )
            continue
        elements = 1
        for d in tensor.dims:
            elements *= d
        if elements >= 1 << 63:
            yield _finding(
                "TG911", f"tensor {tensor.name!r}: shape {tensor.dims} overflows int64", where
            )
            continue
        if tensor.offset % align:
            yield _finding(
                "TG911",
                f"tensor {tensor.name!r} offset {tensor.offset} is not a "
                f"multiple of the alignment {align}",
                where,
            )
        sizes = GGML_TYPES.get(tensor.ggml_type)
        if sizes is None:
            yield _finding(
                "TG913",
                f"tensor {tensor.name!r} has ggml type "
                f"{tensor.ggml_type}, unknown to trainguard; its size is "
                "unchecked",
                where,
            )
            continue
        block, block_bytes = sizes
        row = tensor.dims[0] if tensor.dims else 1
        if row % block:
            yield _finding(
                "TG911",
                f"tensor {tensor.name!r}: rows of {row} elements do not "
                f"fill blocks of {block} (type {tensor.ggml_type})",
                where,
            )
            continue
        nbytes = elements // block * block_bytes
        placed.append((tensor.offset, tensor.offset + nbytes, tensor))
    yield from _check_spans(placed, data_start, align, file_size)


def _check_spans(
    placed: list[tuple[int, int, _Tensor]], data_start: int, align: int, file_size: int | None
) -> Iterator[Finding]:
    expected = 0
    in_order = True
    for begin, end, _tensor in placed:  # llama.cpp wants declaration order, padded
        if begin != expected:
            in_order = False
        expected = -(-end // align) * align
    spans = sorted(placed, key=lambda s: (s[0], s[1]))
    reach = 0
    for begin, end, tensor in spans:
        if begin < reach:
            yield _finding(
                "TG911",
                f"tensor {tensor.name!r} at data bytes [{begin}, {end}) "
                f"overlaps another tensor ending at {reach}",
                tensor.at,
                trigger=tensor.name,
            )
        reach = max(reach, end)
        if file_size is not None and data_start + end > file_size:
            yield _finding(
                "TG911",
                f"tensor {tensor.name!r} ends at byte "
                f"{data_start + end:,}, past the {file_size:,}-byte file",
                tensor.at,
                trigger=tensor.name,
            )
    if not in_order:
        yield _finding(
            "TG913",
            "tensors are not laid out contiguously in declaration order "
            "(llama.cpp refuses that; other readers follow the offsets)",
        )
    padded_end = data_start + -(-reach // align) * align
    if file_size is not None and spans and file_size > padded_end:
        yield _finding(
            "TG913",
            f"{file_size - padded_end:,} bytes after the last tensor belong to none",
            padded_end,
        )
