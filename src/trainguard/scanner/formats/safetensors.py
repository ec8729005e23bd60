"""safetensors: an 8-byte little-endian header length, a JSON header, raw tensor bytes.

Only the header is read, never the tensor bytes.  Every invariant the
reference loader enforces (``validate`` in safetensors' ``tensor.rs``) is
checked with exact integer arithmetic, and so are the things it lets through:
duplicate keys (JSON readers disagree about which wins) and code-like text in
``__metadata__`` (inert for safetensors, live for a loader that decodes it).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

from trainguard.findings import Finding
from trainguard.rules import finding
from trainguard.scanner.base import Blob, ScanContext

# Bits per element of every dtype safetensors 0.8 knows (the Rust ``Dtype`` enum).
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
_U64 = 1 << 64  # the reference loader computes sizes in usize: larger is an overflow
_MAX_STRUCTURE_FINDINGS = 20
_MAX_METADATA_FINDINGS = 20
# Header lengths above this are not even sniffed as safetensors: 8 bytes of
# text ("12345678{") read as a length are far larger.
_SNIFF_MAX_HEADER = 1 << 32


def _finding(
    rule_id: str,
    message: str,
    *,
    offset: int | None = 8,
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


class _Duplicates:
    """``object_pairs_hook`` that keeps JSON's last-wins dict and records repeated keys."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def __call__(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen and len(self.keys) < _MAX_STRUCTURE_FINDINGS:
                self.keys.append(key)
            seen.add(key)
        return dict(pairs)


def _reject_constant(name: str) -> None:
    # NaN and Infinity are Python extensions to JSON; serde_json refuses them.
    raise ValueError(f"non-standard JSON constant {name}")


def _count(value: object) -> int | None:
    """A JSON non-negative integer (not a bool, not a float), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


class SafetensorsFormat:
    name = "safetensors"

    def sniff(self, head: bytes, blob: Blob) -> bool:
        if len(head) < 9 or head[8:9] != b"{":
            return False
        n: int = struct.unpack("<Q", head[:8])[0]
        return 2 <= n < _SNIFF_MAX_HEADER

    def scan(self, ctx: ScanContext, blob: Blob) -> Iterator[Finding]:
        with blob.open() as f:
            n = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))[0]
            if n > ctx.limits.max_safetensors_header:
                yield _finding(
                    "TG801",
                    f"header length {n:,} exceeds the format's cap of "
                    f"{ctx.limits.max_safetensors_header:,} bytes",
                    offset=0,
                )
                return
            if blob.size is not None and 8 + n > blob.size:
                yield _finding(
                    "TG801",
                    f"header length {n:,} reaches past the end of the {blob.size:,}-byte file",
                    offset=0,
                )
                return
            raw = f.read(n)
        if len(raw) < n:
            yield _finding("TG801", f"file ends inside the {n:,}-byte header")
            return
        dups = _Duplicates()
        try:
            header = json.loads(
                raw.decode("utf-8"), object_pairs_hook=dups, parse_constant=_reject_constant
            )
        except UnicodeDecodeError as exc:
            yield _finding("TG801", f"header is not UTF-8: {exc.reason} at byte {exc.start}")
            return
        except RecursionError:
            yield _finding("TG801", "header JSON is nested too deeply to parse")
            return
        except ValueError as exc:  # JSONDecodeError, NaN/Infinity, over-long integers
            yield _finding("TG801", f"header is not valid JSON: {exc}")
            return
        for key in dups.keys:
            yield _finding(
                "TG802",
                f"key {key!r} appears more than once in the header; "
                "readers disagree about which one counts",
                trigger=key,
            )
        if not isinstance(header, dict):
            yield _finding("TG801", f"header is a JSON {type(header).__name__}, not an object")
            return
        data_len = None if blob.size is None else blob.size - 8 - n
        yield from _check_structure(header, data_len)
        yield from _check_metadata(header.get("__metadata__"))


def _check_structure(header: dict[str, Any], data_len: int | None) -> Iterator[Finding]:
    problems: list[str] = []
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (
                isinstance(info, dict) and all(isinstance(v, str) for v in info.values())
            ):
                problems.append("__metadata__ must map strings to strings")
            continue
        span = _tensor_span(name, info, problems)
        if span is not None:
            spans.append((*span, name))
    spans.sort()
    expected = 0
    for begin, end, name in spans:
        if begin < expected:
            problems.append(
                f"tensor {name!r} at bytes [{begin}, {end}) overlaps the tensor "
                f"before it, which ends at {expected}"
            )
        elif begin > expected:
            problems.append(
                f"tensor {name!r} starts at byte {begin}: bytes [{expected}, "
                f"{begin}) belong to no tensor"
            )
        expected = max(expected, end)
    if data_len is not None and expected != data_len:
        problems.append(
            f"tensors cover {expected:,} bytes of data but the file holds "
            f"{data_len:,} after the header"
        )
    for text in problems[:_MAX_STRUCTURE_FINDINGS]:
        yield _finding("TG801", text)
    if len(problems) > _MAX_STRUCTURE_FINDINGS:
        yield _finding(
            "TG801",
            f"{len(problems) - _MAX_STRUCTURE_FINDINGS} more structural problems not listed",
        )


def _tensor_span(name: str, info: object, problems: list[str]) -> tuple[int, int] | None:
    """The tensor's [begin, end) if its entry is well formed; problems are appended."""
    if not isinstance(info, dict):
        problems.append(f"entry {name!r} is not an object")
        return None
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    bits = DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
    if bits is None:
        problems.append(f"tensor {name!r} has unknown dtype {dtype!r}")
    dims = [_count(d) for d in shape] if isinstance(shape, list) else [None]
    if None in dims:
        problems.append(f"tensor {name!r} has an invalid shape {shape!r}")
    pair = [_count(o) for o in offsets] if isinstance(offsets, list) else []
    if len(pair) != 2 or pair[0] is None or pair[1] is None or pair[0] > pair[1]:
        problems.append(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        return None
    begin, end = pair[0], pair[1]
    if end >= _U64:
        problems.append(f"tensor {name!r} ends past 2**64")
        return None
    if bits is not None and None not in dims:
        elements = 1
        for d in dims:
            elements *= d or 0
        total_bits = elements * bits
        if total_bits >= 8 * _U64:
            problems.append(f"tensor {name!r}: shape {shape} overflows the size computation")
        elif total_bits % 8:
            problems.append(
                f"tensor {name!r}: {elements} elements of {dtype} do not fill whole bytes"
            )
        elif total_bits // 8 != end - begin:
            problems.append(
                f"tensor {name!r}: shape {shape} of {dtype} needs "
                f"{total_bits // 8:,} bytes but data_offsets span {end - begin:,}"
            )
    return begin, end


def _check_metadata(metadata: object) -> Iterator[Finding]:
    from trainguard.scanner.formats import codelike

    if not isinstance(metadata, dict):
        return
    reported = 0
    for key, value in metadata.items():
        for text in (key, value):
            if not isinstance(text, str):
                continue
            hit = codelike.code_like(text)
            if hit is None:
                continue
            what, excerpt = hit
            yield _finding(
                "TG803",
                f"__metadata__[{key!r}] holds {what}",
                trigger=str(key),
                evidence={"excerpt": excerpt},
            )
            reported += 1
            if reported >= _MAX_METADATA_FINDINGS:
                return
            break
