"""TorchScript archives: the ``code/`` folder judged on the operators it calls.

``torch.jit.load`` compiles every ``code/**/*.py`` member and runs the
modules' ``__setstate__`` while loading; ``forward`` runs at the first call.
That code is TorchScript, not Python: no ``import``, no ``eval``, no
``os``/``subprocess``, no attribute walks into the interpreter.  What it *can*
reach is every registered operator (``torch.<op>(...)``, ``ops.<ns>.<op>(...)``),
and some of those touch files (``aten::from_file`` maps or creates one,
``aten::save``), and custom namespaces run whatever native library the loading
process registered.  So each call is judged by its operator:

- an operator that reads, maps or writes files: TG113 critical;
- an operator outside torch's own namespaces (aten, prim, quantized, ...):
  TG113 high (native code the archive cannot vouch for);
- a ``__setstate__`` method (runs inside torch.jit.load): TG113 low, listed
  so that a reviewer knows load-time code exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import BinaryIO

from trainguard.findings import Finding, Severity
from trainguard.rules import finding
from trainguard.scanner import ziplenient
from trainguard.scanner.base import Blob, ScanContext

_CALL = re.compile(r"\b((?:torch|ops)(?:\.[A-Za-z_]\w*)+)\s*\(")
_SETSTATE = re.compile(r"^\s*def __setstate__\(", re.MULTILINE)
_FILE_OPS = frozenset(
    """
    from_file save load _save _load fromfile memmap open_memmap load_library
    """.split()
)
_TORCH_NAMESPACES = frozenset(
    ["aten", "prim", "quantized", "_quantized", "prepacked", "profiler", "_caffe2", "cuda"]
)
_MAX_CODE = 16 << 20


class TorchScriptFlavour:
    name = "torchscript"

    def matches(self, names: frozenset[str]) -> bool:
        return any(n.endswith("constants.pkl") for n in names) and any(
            "/code/" in n or n.startswith("code/") for n in names
        )

    def scan(
        self, ctx: ScanContext, blob: Blob, f: BinaryIO, directory: ziplenient.ZipDirectory
    ) -> Iterator[Finding]:
        for entry in directory.entries:
            name = entry.name
            if not name.endswith(".py") or not ("/code/" in name or name.startswith("code/")):
                continue
            member = f"{blob.name}/{name}" if blob.name else name
            if entry.size > _MAX_CODE:
                yield finding("TG002", f"TorchScript code of {entry.size} bytes", member=member)
                continue
            with ziplenient.open_member(f, entry, ctx.limits) as m:
                text = m.read(_MAX_CODE).decode("utf-8", "replace")
            yield from _judge(text, member)


def _judge(text: str, member: str) -> Iterator[Finding]:
    seen: set[str] = set()
    for match in _CALL.finditer(text):
        op = match.group(1)
        if op in seen:
            continue
        seen.add(op)
        parts = op.split(".")
        line = text.count("\n", 0, match.start()) + 1
        if parts[-1] in _FILE_OPS:
            yield finding(
                "TG113",
                f"TorchScript code calls {op}, an operator that reads, maps or writes files",
                member=member,
                trigger=op,
                evidence={"line": str(line)},
            )
        elif parts[0] == "ops" and len(parts) >= 3 and parts[1] not in _TORCH_NAMESPACES:
            yield finding(
                "TG113",
                f"TorchScript code calls the custom operator {op}: native code registered by "
                "a library the loading process imported, not by torch",
                member=member,
                trigger=op,
                severity=Severity.HIGH,
                evidence={"line": str(line)},
            )
    for match in _SETSTATE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        yield finding(
            "TG113",
            "TorchScript __setstate__: code that torch.jit.load runs while loading",
            member=member,
            trigger="__setstate__",
            severity=Severity.LOW,
            evidence={"line": str(line)},
        )
