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
from trainguard.limits import DEFAULT_LIMITS
from trainguard.rules import finding
from trainguard.scanner.base import Blob, ScanContext
from trainguard.scanner.formats.joblib_arrays import JoblibArrayHook
from trainguard.scanner.picklevm.analysis import PickleContext, analyse
from trainguard.scanner.picklevm.machine import PickleEvents, PickleMachine
from trainguard.scanner.picklevm.probe import Probe, probe_head, probe_stream
from trainguard.scanner.stream import ByteStream

# The first pickle of torch's legacy (non-zip) format is this magic number.
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PICKLES = 5  # magic, protocol version, sys_info, the object, storage keys


def strong_sniff(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def weak_sniff(head: bytes, *, complete: bool | None = None) -> bool:
    """True unless a pickle loader would fail on ``head`` before doing anything.

    No magic number decides this: the symbolic machine runs over the head the
    way ``pickle.load`` would (any protocol, no PROTO, FRAME first, a break
    right after the payload).  A head that ends mid-stream counts as a pickle.
    """
    if complete is None:
        complete = len(head) < DEFAULT_LIMITS.sniff_size
    return probe_head(head, complete=complete) is not Probe.REJECTS


class PickleFormat:
    name = "pickle"

    def sniff(self, head: bytes, blob: Blob) -> bool:
        if strong_sniff(head):
            return True
        complete = len(head) < DEFAULT_LIMITS.sniff_size
        return probe_head(head, complete=complete) in (Probe.EXECUTES, Probe.ACCEPTS)

    def loader_verdict(self, ctx: ScanContext, head: bytes, blob: Blob) -> Probe:
        """What ``pickle.load`` (or a legacy ``torch.load``) would do with ``blob``.

        The head decides almost always; when it ends mid-stream the whole blob
        is run through the machine (bounded by the scan's limits and deadline).
        """
        found = probe_head(head, complete=len(head) < ctx.limits.sniff_size, limits=ctx.limits)
        if found is not Probe.UNDECIDED:
            return found
        with blob.open() as raw:
            found = probe_stream(ByteStream(raw, size=blob.size), ctx.limits, ctx.deadline)
        # A bound stopped the machine before an answer: fail closed, it may be a pickle.
        return Probe.EXECUTES if found is Probe.UNDECIDED else found

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
