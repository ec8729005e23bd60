"""``trainguard diff A B``: what changed between two checkpoints, tensor by tensor.

Equality is exact: two tensors are equal when their bytes are, so a one-ulp
edit is a change (and ``0.0`` vs ``-0.0`` is one too).  Numeric statistics are
computed in float64, chunk by chunk, over the elements finite on both sides;
non-finite ones are counted apart.  Only two tensors (one from each side) and
one chunk of float64 temporaries are held at a time, except for checkpoints
that :mod:`~trainguard.explain.diff.sources` must load whole.

The report's types are in :mod:`~trainguard.explain.diff.result`; the forensic
checks (what an honest optimizer step could not have produced) in
:mod:`~trainguard.explain.diff.checks`; renderers in :mod:`~trainguard.render.diff`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainguard.explain.diff.checks import forensics
from trainguard.explain.diff.entries import (
    CHUNK,
    TensorEntry,
    TensorSource,
    ValueEntry,
    as_f64,
    dtype,
)
from trainguard.explain.diff.result import DiffReport, SideInfo, TensorDiff, ValueDiff
from trainguard.explain.diff.sources import open_checkpoint
from trainguard.findings import Severity
from trainguard.limits import DEFAULT_LIMITS, Limits
from trainguard.scanner import Policy

MAX_INDICES = 4096  # changed flat indices kept per tensor (for evidence and row analysis)
NUMERIC_KINDS = frozenset({"float", "bfloat16", "int", "bool"})

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, tensor path)


@dataclass
class _Acc:
    changed: int = 0
    indices: list[int] = field(default_factory=list)
    max_abs: float = 0.0
    dd: float = 0.0
    aa: float = 0.0
    bb: float = 0.0
    ab: float = 0.0
    bad_a: int = 0
    bad_b: int = 0


def _bits(chunk: np.ndarray) -> np.ndarray:
    size = chunk.dtype.itemsize
    if size in (1, 2, 4, 8):
        return chunk.view(f"<u{size}")
    return chunk.view("<u8").reshape(-1, size // 8)


def compare_arrays(
    a: np.ndarray, b: np.ndarray, dtype_a: str, dtype_b: str, out: TensorDiff
) -> None:
    """Fill ``out``'s statistics from two flat arrays of equal length."""
    same_dtype = dtype_a == dtype_b
    numeric = dtype(dtype_a).kind in NUMERIC_KINDS and dtype(dtype_b).kind in NUMERIC_KINDS
    acc = _Acc()
    for start in range(0, len(a), CHUNK):
        ca, cb = a[start : start + CHUNK], b[start : start + CHUNK]
        fa = as_f64(ca, dtype_a) if numeric else None
        fb = as_f64(cb, dtype_b) if numeric else None
        if same_dtype:
            neq = _bits(ca) != _bits(cb)
            if neq.ndim > 1:
                neq = neq.any(axis=1)
        else:
            assert fa is not None and fb is not None
            neq = (fa != fb) & ~(np.isnan(fa) & np.isnan(fb))
        n_changed = int(np.count_nonzero(neq))
        if n_changed and len(acc.indices) < MAX_INDICES:
            found = np.flatnonzero(neq)[: MAX_INDICES - len(acc.indices)] + start
            acc.indices.extend(int(i) for i in found)
        acc.changed += n_changed
        if fa is not None and fb is not None:
            _accumulate(acc, fa, fb)
    out.changed, out.indices = acc.changed, acc.indices
    if numeric:
        out.max_abs = acc.max_abs
        out.l2_diff, out.l2_a, out.l2_b = (math.sqrt(x) for x in (acc.dd, acc.aa, acc.bb))
        denom = out.l2_a * out.l2_b
        out.cosine = acc.ab / denom if denom > 0 else None
        out.nonfinite_a, out.nonfinite_b = acc.bad_a, acc.bad_b


def _accumulate(acc: _Acc, fa: np.ndarray, fb: np.ndarray) -> None:
    ok_a, ok_b = np.isfinite(fa), np.isfinite(fb)
    acc.bad_a += int(len(fa) - np.count_nonzero(ok_a))
    acc.bad_b += int(len(fb) - np.count_nonzero(ok_b))
    ok = ok_a & ok_b
    if not ok.all():
        fa, fb = fa[ok], fb[ok]
    if not len(fa):
        return
    d = fb - fa
    acc.max_abs = max(acc.max_abs, float(np.max(np.abs(d))))
    acc.dd += float(np.dot(d, d))
    acc.aa += float(np.dot(fa, fa))
    acc.bb += float(np.dot(fb, fb))
    acc.ab += float(np.dot(fa, fb))


def _describe(entry: TensorEntry | ValueEntry | None) -> str | None:
    if entry is None:
        return None
    if isinstance(entry, TensorEntry):
        return f"<tensor {entry.dtype}{list(entry.shape)}>"
    return entry.text


def _shown(
    status: str, ea: TensorEntry | ValueEntry | None, eb: TensorEntry | ValueEntry | None
) -> bool:
    """Containers are listed only for what their leaves cannot show."""
    entry = ea if ea is not None else eb
    if not isinstance(entry, ValueEntry) or entry.keys is None:
        return True
    if status == "same":
        return False
    # An added or removed container with items shows through them; an empty one
    # (a key holding []) has nothing else to show it.
    return status == "changed" or not entry.length


def _same_value(ea: TensorEntry | ValueEntry | None, eb: TensorEntry | ValueEntry | None) -> bool:
    if not isinstance(ea, ValueEntry) or not isinstance(eb, ValueEntry):
        return _describe(ea) == _describe(eb)
    if ea.keys is None or eb.keys is None:
        # The digest decides (it covers the whole value; a set's items in sorted order):
        # the text is for display, and a set's repr order changes from run to run.
        return ea.digest == eb.digest
    if ea.type != eb.type:  # a list saved as a tuple, a dict as an OrderedDict
        return False
    # Added or removed keys are their own entries; what only the container shows
    # is a key of another type under the same name (1 vs "1"): torch.load, a
    # state_dict lookup and an optimizer's state see different objects.
    types_b = dict((name, kind) for kind, name in eb.keys)
    return all(types_b.get(name, kind) == kind for kind, name in ea.keys)


def _side(src: TensorSource) -> SideInfo:
    tensors = [e for e in src.entries.values() if isinstance(e, TensorEntry)]
    return SideInfo(
        src.path,
        src.format,
        src.size,
        len(tensors),
        sum(t.nbytes for t in tensors),
        src.streamed,
    )


def compare(sa: TensorSource, sb: TensorSource, progress: Progress | None = None) -> DiffReport:
    """Every entry of ``sa`` against ``sb`` (no forensic checks).

    Entries are paired by their typed key path where both files have one (a
    pickled structure), so dotted names that collide cannot pair the wrong
    tensors; by name otherwise (safetensors, whose names are flat).
    """
    report = DiffReport(_side(sa), _side(sb))
    pairs = _pairs(sa, sb)
    total = sum(
        first.nbytes
        for na, nb in pairs
        if na is not None
        and nb is not None
        and isinstance(first := sa.entries[na], TensorEntry)
        and isinstance(sb.entries[nb], TensorEntry)
    )
    done = 0
    for na, nb in pairs:
        ea = sa.entries[na] if na is not None else None
        eb = sb.entries[nb] if nb is not None else None
        path = na if na is not None else str(nb)
        if isinstance(ea, TensorEntry) and isinstance(eb, TensorEntry):
            assert na is not None and nb is not None
            report.tensors.append(_tensor_diff(sa, sb, na, nb, ea, eb))
            done += ea.nbytes
            if progress is not None:
                progress(done, total, path)
        elif isinstance(ea, TensorEntry) and eb is None:
            report.tensors.append(
                TensorDiff(path, "removed", ea.dtype, None, ea.shape, None, ea.numel)
            )
        elif isinstance(eb, TensorEntry) and ea is None:
            report.tensors.append(
                TensorDiff(path, "added", None, eb.dtype, None, eb.shape, eb.numel)
            )
        else:
            da, db = _describe(ea), _describe(eb)
            kinds = (type(ea), type(eb))
            if ea is None:
                status = "added"
            elif eb is None:
                status = "removed"
            else:
                status = "same" if kinds[0] is kinds[1] and _same_value(ea, eb) else "changed"
            if _shown(status, ea, eb):
                report.values.append(ValueDiff(path, status, da, db))
    return report


def _pairs(sa: TensorSource, sb: TensorSource) -> list[tuple[str | None, str | None]]:
    """(name in a, name in b) for every entry of either, in a's order then b's."""
    typed = len(sa.trails) == len(sa.entries) and len(sb.trails) == len(sb.entries)
    if not typed:
        names = list(sa.entries) + [n for n in sb.entries if n not in sa.entries]
        return [(n if n in sa.entries else None, n if n in sb.entries else None) for n in names]
    in_b = {trail: name for name, trail in sb.trails.items()}
    pairs: list[tuple[str | None, str | None]] = []
    seen: set[object] = set()
    for name, trail in sa.trails.items():
        pairs.append((name, in_b.get(trail)))
        seen.add(trail)
    pairs += [(None, name) for name, trail in sb.trails.items() if trail not in seen]
    return pairs


def _tensor_diff(
    sa: TensorSource, sb: TensorSource, na: str, nb: str, ea: TensorEntry, eb: TensorEntry
) -> TensorDiff:
    out = TensorDiff(na, "same", ea.dtype, eb.dtype, ea.shape, eb.shape, ea.numel)
    if ea.shape != eb.shape:
        out.status = "retyped" if ea.dtype != eb.dtype else "reshaped"
        return out
    if ea.dtype != eb.dtype:
        out.status = "retyped"
        if {dtype(ea.dtype).kind, dtype(eb.dtype).kind} <= NUMERIC_KINDS:
            compare_arrays(sa.read(na), sb.read(nb), ea.dtype, eb.dtype, out)
        return out
    a, b = sa.read(na), sb.read(nb)
    if len(a) != len(b):  # raw dtypes of different byte spans
        out.status = "changed"
        return out
    compare_arrays(a, b, ea.dtype, eb.dtype, out)
    if out.changed:
        out.status = "changed"
    return out


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    policy: Policy | None = None,
    strict: bool = False,
    limits: Limits = DEFAULT_LIMITS,
    progress: Progress | None = None,
    fail_on: Severity = Severity.HIGH,
    sidecar: bool = False,
) -> DiffReport:
    """Compare checkpoint ``a`` (older) with ``b`` (newer), with the forensic checks.

    Both files go through the scanner first: anything it refuses raises
    :class:`~trainguard.errors.UnsafeModelError` before a byte of it is loaded.
    """

    def opened(path: str | os.PathLike[str]) -> TensorSource:
        return open_checkpoint(path, policy=policy, strict=strict, limits=limits, sidecar=sidecar)

    with opened(a) as sa:
        with opened(b) as sb:
            report = compare(sa, sb, progress)
            report.fail_on = fail_on
            findings, notes = forensics(sa, sb, report)
            report.findings.extend(findings)
            report.notes.extend(notes)
            for side in (sa, sb):
                report.notes.extend(_sidecar_note(side.path, sidecar))
                if not side.streamed:
                    report.notes.append(
                        f"{side.path} ({side.format}) was loaded whole: memory held all of it"
                    )
    return report


def _sidecar_note(path: str, asked: bool) -> list[str]:
    side = Path(path).with_suffix(".json")
    if Path(path).suffix != ".safetensors" or not side.is_file():
        return []
    if asked:
        return [f"{path}: tensor names and values taken from the sidecar {side} (--sidecar)"]
    return [f"{side} (a JSON sidecar) was not read; --sidecar takes names and values from it"]
