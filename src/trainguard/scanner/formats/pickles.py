"""Raw pickle streams (protocols 0-5), concatenated pickles, PyTorch's legacy format and joblib.

All four are "a sequence of pickles with maybe some raw data in between", so
one scanner reads them: pickle after pickle until the data ends, with the
joblib hook skipping array bytes that sit between opcodes, and the legacy
torch layout recognised by its magic number so its tensor data is not taken
for trailing garbage.
"""

from __future__ import annotations

from collections.abc import Iterator

from trainguard.findings import Finding
from trainguard.rules import finding
from trainguard.scanner.base import Blob, ScanContext
from trainguard.scanner.formats.joblib_arrays import JoblibArrayHook
from trainguard.scanner.picklevm.analysis import PickleContext, analyse
from trainguard.scanner.picklevm.machine import PickleEvents, PickleMachine
from trainguard.scanner.stream import ByteStream

# The first pickle of torch's legacy (non-zip) format is this magic number.
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PICKLES = 5  # magic, protocol version, sys_info, the object, storage keys

# Opcodes that can start a protocol 0/1 pickle (no PROTO header).
_P0_FIRST = frozenset(b"(]})NIJKLMFSTUVXcd\x88\x89\x8a\x8b\x8cGhjqrp")


def strong_sniff(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def weak_sniff(head: bytes) -> bool:
    """A protocol 0/1 pickle has no magic: parse the head and see if it holds together."""
    if not head or head[0] not in _P0_FIRST:
        return False
    ev = PickleMachine(ByteStream.of_bytes(head)).run()
    if ev.end is not None:
        return True
    # The head may cut a long pickle short: accept it if it parsed cleanly up
    # to the cut and contained pickle structure (an import or a container).
    return (
        (ev.error or "").startswith("truncated")
        and ev.opcodes >= 4
        and (bool(ev.globals) or ev.opcodes >= 16)
    )


class PickleFormat:
    name = "pickle"

    def sniff(self, head: bytes, blob: Blob) -> bool:
        return strong_sniff(head) or weak_sniff(head)

    def scan(self, ctx: ScanContext, blob: Blob) -> Iterator[Finding]:
        yield from scan_pickle_stream(ctx, blob, persistent_ids_expected=False)


def scan_pickle_stream(
    ctx: ScanContext, blob: Blob, *, persistent_ids_expected: bool
) -> Iterator[Finding]:
    pctx = PickleContext(persistent_ids_expected=persistent_ids_expected, allow=ctx.allow)
    with blob.open() as raw:
        stream = ByteStream(raw, size=blob.size)
        legacy_torch = False
        for index in range(ctx.limits.max_pickles_per_stream):
            start = stream.pos
            machine = PickleMachine(stream, ctx.limits, ctx.deadline)
            machine.after_build = JoblibArrayHook(ctx.limits)
            ev = machine.run()
            if index > 0 and _is_not_a_pickle(ev, start):
                yield finding(
                    "TG108",
                    f"{_remaining(blob, start)} bytes after the last pickle are not a pickle",
                    offset=start,
                )
                return
            if index == 0 and ev.result == TORCH_LEGACY_MAGIC:
                legacy_torch = True
                ctx.formats_seen.append("pytorch-legacy")
                pctx = PickleContext(persistent_ids_expected=True, allow=ctx.allow)
            yield from analyse(ev, pctx, ctx.scan_nested_bytes)
            if ev.end is None:
                return  # broken stream or limit: reported by analyse
            if legacy_torch and index + 1 == _LEGACY_PICKLES:
                return  # the rest is raw storage data
            if stream.peek_eof():
                return
        yield finding(
            "TG002",
            f"more than {ctx.limits.max_pickles_per_stream} pickles in one stream; "
            "the rest was not analysed",
            offset=stream.pos,
        )


def _is_not_a_pickle(ev: PickleEvents, start: int) -> bool:
    """Data after a STOP that fails at once is trailing bytes, not a second pickle."""
    return ev.end is None and ev.opcodes <= 2 and not ev.globals and ev.limit is None


def _remaining(blob: Blob, start: int) -> str:
    return str(blob.size - start) if blob.size is not None else "some"
