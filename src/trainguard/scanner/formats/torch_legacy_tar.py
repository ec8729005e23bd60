"""The ``storages`` and ``tensors`` members of PyTorch's legacy tar checkpoints.

``torch.load`` (``_legacy_load``, any tar with a ``storages`` member) reads
them as pickles interleaved with raw data, and unpickles every one:

- ``storages``: a pickle (the count), then per storage a pickle ``(key,
  location, storage_type)`` followed by an int64 element count and the raw
  elements; then a pickle of storage views.
- ``tensors``: a pickle (the count), then per tensor a pickle ``(key,
  storage_id, type)`` followed by int32 ndim, 4 padding bytes, ndim int64
  sizes, ndim int64 strides and an int64 offset.

Reading only the first pickle would miss a payload in the second storage's
header, so the walk follows torch's reader; where it cannot (an unknown
storage type), it stops with a finding rather than calling the rest clean.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from trainguard.findings import Finding
from trainguard.rules import finding
from trainguard.scanner.base import Blob, ScanContext
from trainguard.scanner.picklevm.analysis import PickleContext, analyse
from trainguard.scanner.picklevm.machine import Global, PickleEvents, PickleMachine
from trainguard.scanner.stream import ByteStream, Truncated

MEMBERS = frozenset(["storages", "tensors"])
_ELEMENT_SIZE = {
    "Float": 4, "Double": 8, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
    "Char": 1, "Byte": 1, "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16,
    "QUInt8": 1, "QInt8": 1, "QInt32": 4, "QUInt4x2": 1, "QUInt2x4": 1,
}  # fmt: skip
_MAX_ENTRIES = 1_000_000


class _Stop(Exception):
    def __init__(self, found: Finding | None) -> None:
        self.found = found  # None: the pickle's own analysis reports why


def scan_member(ctx: ScanContext, blob: Blob, name: str) -> Iterator[Finding]:
    pctx = PickleContext(allow=ctx.allow)
    with blob.open() as raw:
        stream = ByteStream(raw, size=blob.size)
        events: list[PickleEvents] = []

        def next_pickle() -> PickleEvents:
            ev = PickleMachine(stream, ctx.limits, ctx.deadline).run()
            events.append(ev)
            if ev.end is None:
                raise _Stop(None)
            return ev

        try:
            count = next_pickle().result
            if not isinstance(count, int) or not 0 <= count <= _MAX_ENTRIES:
                raise _Stop(finding("TG003", f"legacy torch {name}: bad count {count!r}"))
            for _ in range(count):
                args = next_pickle().result
                if name == "storages":
                    _skip_storage(stream, args, ctx)
                else:
                    ndim = struct.unpack("<i", stream.read(4))[0]
                    if not 0 <= ndim <= 64:
                        raise _Stop(finding("TG003", f"legacy torch tensors: ndim {ndim}"))
                    stream.skip(4 + 16 * ndim + 8)
            if name == "storages":
                next_pickle()  # the storage views
        except _Stop as stop:
            if stop.found is not None:
                yield stop.found
        except Truncated as exc:
            yield finding("TG003", f"legacy torch {name} ends early: {exc}", offset=exc.offset)
        for ev in events:
            yield from analyse(ev, pctx, ctx.scan_nested_bytes)


def _skip_storage(stream: ByteStream, args: object, ctx: ScanContext) -> None:
    storage_type = args[2] if isinstance(args, tuple) and len(args) == 3 else None
    kind = ""
    if isinstance(storage_type, Global) and storage_type.module in ("torch", "torch.cuda"):
        kind = storage_type.name.removesuffix("Storage")
    size = _ELEMENT_SIZE.get(kind)
    if size is None:
        raise _Stop(
            finding(
                "TG003",
                "legacy torch storages: a storage type the scanner cannot size "
                f"({args!r:.80}); the pickles after it were not analysed",
            )
        )
    count = struct.unpack("<q", stream.read(8))[0]
    if count < 0 or count * size > ctx.limits.max_member_size:
        raise _Stop(finding("TG003", f"legacy torch storages: a storage of {count} elements"))
    stream.skip(count * size)
