"""numpy ``.npy`` files (``.npz`` members arrive here through the zip format).

The header is a Python dict literal; it is parsed by a small literal reader of
our own (never ``eval`` or ``ast.literal_eval``, which compiles code).  Plain
arrays are data and are not read; object arrays hold a pickle right after the
header, which the pickle scanner analyses.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import replace
from typing import BinaryIO

from trainguard.findings import Finding
from trainguard.rules import finding
from trainguard.scanner.base import Blob, ScanContext
from trainguard.scanner.formats.dtypes import provably_numeric
from trainguard.scanner.formats.literal import LiteralError, parse_literal
from trainguard.scanner.formats.pickles import scan_pickle_stream

MAGIC = b"\x93NUMPY"


def _bad(message: str, offset: int | None = None) -> Finding:
    return finding("TG302", message, offset=offset)


class NpyFormat:
    name = "numpy"

    def sniff(self, head: bytes, blob: Blob) -> bool:
        return head[:6] == MAGIC

    def scan(self, ctx: ScanContext, blob: Blob) -> Iterator[Finding]:
        with blob.open() as f:
            fixed = f.read(10)
            if len(fixed) < 10:
                yield _bad("truncated .npy preamble")
                return
            major = fixed[6]
            if major == 1:
                hlen = struct.unpack("<H", fixed[8:10])[0]
                start = 10
            elif major in (2, 3):
                fixed += f.read(2)
                if len(fixed) < 12:
                    yield _bad("truncated .npy preamble")
                    return
                hlen = struct.unpack("<I", fixed[8:12])[0]
                start = 12
            else:
                yield _bad(f"unknown .npy format version {major}")
                return
            if hlen > ctx.limits.max_npy_header:
                yield finding(
                    "TG002",
                    f".npy header of {hlen} bytes exceeds the limit",
                    offset=8,
                )
                return
            raw = f.read(hlen)
            if len(raw) < hlen:
                yield _bad("truncated .npy header", offset=start)
                return
            try:
                header = parse_literal(raw.decode("latin-1" if major < 3 else "utf-8"))
            except (LiteralError, UnicodeDecodeError) as exc:
                yield _bad(f".npy header is not a literal dict: {exc}", offset=start)
                return
            if not isinstance(header, dict) or "descr" not in header:
                yield _bad(".npy header lacks 'descr'", offset=start)
                return
        if provably_numeric(header["descr"]):
            return  # plain numbers: data, never executed
        yield finding(
            "TG301",
            f"object array (dtype {header['descr']!r}): loading it unpickles the "
            "data that follows the header",
            offset=start + hlen,
        )
        data_start = start + hlen

        def opener() -> BinaryIO:
            g = blob.open()
            if g.seekable():
                g.seek(data_start)
            else:
                g.read(data_start)
            return g

        size = blob.size - data_start if blob.size is not None else None
        inner = Blob(blob.name, opener, size, blob.depth)
        for found in scan_pickle_stream(ctx, inner, persistent_ids_expected=False):
            off = found.offset
            yield found if off is None else replace(found, offset=off + data_start)
