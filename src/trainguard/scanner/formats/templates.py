"""Chat templates (Jinja): static analysis for template injection.

A model's chat template is rendered by whatever serves it; several servers
rendered it without a sandbox (llama-cpp-python, CVE-2024-34359; SGLang,
CVE-2026-5760), so a template that reaches Python internals is remote code
execution.  Templates are parsed with jinja2's own lexer and parser
(``Environment.parse`` builds an AST; nothing is compiled or rendered) and the
tree is checked by :mod:`template_ast`.  Without jinja2 (the optional extra
``trainguard[templates]``), or for a template that does not parse, a
conservative token scan runs instead and the findings say so.

Used by the GGUF scanner (``tokenizer.chat_template``), by
:mod:`jsonconfig` (``tokenizer_config.json``) and by :class:`ChatTemplateFormat`
for stand-alone ``chat_template.jinja`` files.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING

from trainguard.findings import Finding
from trainguard.limits import Limits
from trainguard.rules import finding
from trainguard.scanner.base import Blob, ScanContext

if TYPE_CHECKING:
    from trainguard.scanner.formats.template_rules import Hit

TEMPLATE_KEY = "tokenizer.chat_template"
_MAX_HITS = 40  # per template; a payload is clear long before that
_HEAD_MARKERS = ("{%", "{{", "{#")
_TEMPITA_BLOCK = re.compile(rb"\{\{py:\s")


def is_template_key(key: str) -> bool:
    """GGUF keys holding chat templates: the default and named ones (``.tool_use``)."""
    return key == TEMPLATE_KEY or key.startswith(TEMPLATE_KEY + ".")


_PARSER: list[ModuleType | None] = []


def parser() -> ModuleType | None:
    """The jinja2-based analysis (:mod:`template_parser`), or None without jinja2.

    Imported on first use, not with the scanner: jinja2 costs more start-up
    time than the rest of a torch checkpoint scan, and most scans see no
    template.  The module name is fixed; nothing a scanned file says can
    choose what is imported.
    """
    if not _PARSER:
        try:
            _PARSER.append(importlib.import_module("trainguard.scanner.formats.template_parser"))
        except ImportError:
            _PARSER.append(None)
    return _PARSER[0]


def have_parser() -> bool:
    return parser() is not None


def analyse_template(source: str, limits: Limits) -> list[Hit]:
    """Everything suspicious in one chat template, most severe first."""
    from trainguard.scanner.formats.template_rules import Hit, token_scan

    size = len(source.encode("utf-8", "surrogatepass"))
    if size > limits.max_chat_template:
        return [
            Hit(
                "TG002",
                f"chat template of {size:,} bytes exceeds the limit of "
                f"{limits.max_chat_template:,}; not analysed",
                "size",
            )
        ]
    analysis = parser()
    if analysis is None:
        hits = [
            Hit(
                "TG903",
                "checked by a token scan only: jinja2 is not installed "
                "(pip install 'trainguard[templates]')",
                "no-jinja2",
            )
        ]
        hits += token_scan(source, "token scan: jinja2 is not installed")
    else:
        hits = analysis.parsed(source, limits)
    unique = {(h.rule, h.evidence.get("line", ""), h.token): h for h in hits}
    ordered = sorted(unique.values(), key=lambda h: -h.severity)
    if len(ordered) <= _MAX_HITS:
        return ordered
    rest = ordered[_MAX_HITS:]
    worst = rest[0].rule  # the most severe of those left out, so the verdict holds
    return [*ordered[:_MAX_HITS], Hit(worst, f"{len(rest)} more findings not listed", "more")]


def template_findings(
    source: str, limits: Limits, label: str, *, offset: int | None = None
) -> Iterator[Finding]:
    """:func:`analyse_template` as findings, each message prefixed with ``label``."""
    for h in analyse_template(source, limits):
        yield Finding(
            h.rule,
            h.severity,
            f"{label}: {h.message}",
            offset=offset,
            trigger=label,
            evidence=h.evidence,
        )


class ChatTemplateFormat:
    """A stand-alone template file (``chat_template.jinja``), recognised by its first tag."""

    name = "chat-template"

    def sniff(self, head: bytes, blob: Blob) -> bool:
        if b"\0" in head:
            return False
        text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
        if _TEMPITA_BLOCK.match(text):
            # Cython's Tempita code block ({{py: ...}}): "py:" is a syntax error in
            # every Jinja dialect, and a renderer parses the whole file before it
            # renders anything, so no chat-template loader can run this file.
            return False
        return text.startswith(tuple(m.encode() for m in _HEAD_MARKERS)) and _is_utf8(head)

    def scan(self, ctx: ScanContext, blob: Blob) -> Iterator[Finding]:
        cap = ctx.limits.max_chat_template
        with blob.open() as f:
            raw = f.read(cap + 1)
        if len(raw) > cap:
            yield finding(
                "TG002",
                f"chat template longer than the limit of {cap:,} bytes; not analysed",
            )
            return
        text = raw.decode("utf-8", "replace").removeprefix("\ufeff")
        yield from template_findings(text, ctx.limits, "chat template")


def _is_utf8(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3  # a character cut by the end of the head
    return True
