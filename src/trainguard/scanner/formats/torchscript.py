"""TorchScript archives: the ``code/`` folder judged on the operators it calls.

``torch.jit.load`` compiles every ``code/**/*.py`` member and runs the
modules' ``__setstate__`` while loading; ``forward`` runs at the first call.
That code is TorchScript, not Python: no ``import``, no ``eval``, no
``os``/``subprocess``, no attribute walks into the interpreter.  What it *can*
reach is every registered operator (``torch.<op>(...)``, ``ops.<ns>.<op>(...)``),
and some of those touch files (``aten::from_file`` maps or creates one,
``aten::save``), and custom namespaces run whatever native library the loading
process registered.  The text is read as Python's tokenizer reads it (never
compiled): TorchScript's lexer accepts the same spellings, so ``torch . from_file (``
split by spaces, comments, brackets or a backslash is the chain it means, an alias
(``a = ops.aten``) resolves, and text that does not tokenize is high.  Every
chain rooted in ``torch``/``ops`` is judged, called or not, in every method:

- an operator that reads, maps or writes files: TG113 critical;
- an operator outside torch's own namespaces (aten, prim, quantized, ...), a
  custom C++ class, a namespace taken as a value or looked up by name:
  TG113 high (native code the archive cannot vouch for);
- a ``__setstate__`` method (runs inside torch.jit.load): TG113 low, listed
  so that a reviewer knows load-time code exists.
"""

from __future__ import annotations

import io
import itertools
import tokenize
from collections.abc import Iterator
from typing import BinaryIO

from trainguard.findings import Finding, Severity
from trainguard.rules import finding
from trainguard.scanner import ziplenient
from trainguard.scanner.base import Blob, ScanContext

_ROOTS = frozenset(["torch", "ops"])
_FILE_OPS = frozenset(
    """
    from_file save load _save _load fromfile memmap open_memmap load_library load_tensor
    """.split()
)
# Name lookups on a namespace: the operator they reach is a string, not a token.
_REFLECTION = frozenset(["__getattr__", "__getattribute__", "__dict__", "getattr"])
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
    try:
        # Python's tokenizer on the text (never compiled): comments, line breaks
        # inside brackets and backslash continuations vanish, so `torch . from_file (`
        # split any way reads as the chain it is for TorchScript's own lexer.
        tokens = [
            t
            for t in tokenize.generate_tokens(io.StringIO(text).readline)
            if t.type not in (tokenize.COMMENT, tokenize.NL)
        ]
        bad = next((t for t in tokens if t.type == tokenize.ERRORTOKEN), None)
        if bad is not None:
            raise SyntaxError(f"line {bad.start[0]}: {bad.string!r}")
    except (tokenize.TokenError, SyntaxError) as exc:
        yield finding(
            "TG113",
            f"TorchScript code that cannot be tokenized ({exc}); its operators cannot be judged",
            member=member,
            severity=Severity.HIGH,
        )
        return
    seen: set[tuple[str, str]] = set()
    aliases: dict[str, tuple[str, ...]] = {}
    for chain, line, target in _chains(tokens):
        resolved = _resolve(chain, aliases)
        if target is not None and resolved[0] in _ROOTS:
            # `f = torch.from_file` then `f(...)`: later uses of f mean the chain.
            aliases[target] = resolved
        verdict = _operator(resolved)
        if verdict is None or (verdict[1], ".".join(chain)) in seen:
            continue
        seen.add((verdict[1], ".".join(chain)))
        severity, why = verdict
        yield finding(
            "TG113",
            f"TorchScript code uses {'.'.join(chain)}: {why}",
            member=member,
            trigger=".".join(resolved),
            severity=severity,
            evidence={"line": str(line)},
        )
    for a, b in itertools.pairwise(tokens):
        if a.string == "def" and b.string == "__setstate__":
            yield finding(
                "TG113",
                "TorchScript __setstate__: code that torch.jit.load runs while loading",
                member=member,
                trigger="__setstate__",
                severity=Severity.LOW,
                evidence={"line": str(b.start[0])},
            )


def _chains(
    tokens: list[tokenize.TokenInfo],
) -> Iterator[tuple[tuple[str, ...], int, str | None]]:
    """Each dotted name chain, its line, and the name it is assigned to (``x = chain``)."""
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t.type != tokenize.NAME or (i and tokens[i - 1].string == "."):
            i += 1
            continue
        parts = [t.string]
        j = i + 1
        while (
            j + 1 < len(tokens) and tokens[j].string == "." and tokens[j + 1].type == tokenize.NAME
        ):
            parts.append(tokens[j + 1].string)
            j += 2
        target = None
        if (
            i >= 2
            and tokens[i - 1].string == "="
            and tokens[i - 2].type == tokenize.NAME
            and (j >= len(tokens) or tokens[j].type == tokenize.NEWLINE)
        ):
            target = tokens[i - 2].string
        yield tuple(parts), t.start[0], target
        i = j


def _resolve(chain: tuple[str, ...], aliases: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    if chain[0] in aliases:
        chain = aliases[chain[0]] + chain[1:]
    if chain[:2] == ("torch", "ops"):
        chain = chain[1:]
    return chain


def _operator(chain: tuple[str, ...]) -> tuple[Severity, str] | None:
    """What a chain rooted in torch's namespaces reaches, or None when harmless."""
    root = chain[0]
    if root == "__torch__":
        # The archive's own TorchScript classes (judged here, by their code), except
        # custom C++ classes registered under __torch__.torch.classes.
        if chain[1:3] == ("torch", "classes"):
            return _custom_class(chain[3:])
        return None
    if root not in _ROOTS:
        return None
    rest = chain[1:]
    if any(p in _FILE_OPS for p in rest):
        return Severity.CRITICAL, "an operator that reads, maps or writes files"
    if any(p in _REFLECTION for p in rest):
        return Severity.HIGH, "a lookup by name; which operator it reaches cannot be told"
    if root == "torch" and rest[:1] == ("classes",):
        return _custom_class(rest[1:])
    if root == "ops":
        if len(rest) < 2:
            return Severity.HIGH, "an operator namespace taken as a value"
        if rest[0] not in _TORCH_NAMESPACES:
            return Severity.HIGH, (
                "a custom operator: native code registered by a library the loading "
                "process imported, not by torch"
            )
        return None
    if not rest:
        return Severity.HIGH, "the torch namespace taken as a value"
    return None


def _custom_class(rest: tuple[str, ...]) -> tuple[Severity, str] | None:
    if rest and rest[0] in _TORCH_NAMESPACES:
        return None
    return Severity.HIGH, "a custom C++ class registered by a library, not by torch"
