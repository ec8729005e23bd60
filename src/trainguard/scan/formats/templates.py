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

# jinja2's lexer decodes string literals with this codec, which Python loads lazily;
# load it now: a scan itself never imports anything (tests/test_no_execution.py).
import encodings.unicode_escape  # noqa: F401
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from trainguard.findings import Finding
from trainguard.limits import Limits
from trainguard.rules import finding
from trainguard.scan.base import Blob, ScanContext
from trainguard.scan.formats.template_rules import Hit, hit, token_scan

if TYPE_CHECKING:
    from jinja2 import nodes

try:  # imported up front: a scan itself must never import (tests/test_no_execution.py)
    from jinja2 import Environment, TemplateSyntaxError
    from jinja2 import nodes as _nodes
    from jinja2.ext import Extension, LoopControlExtension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from trainguard.scan.formats import template_ast, template_triggers

    class _GenerationTag(Extension):
        """transformers' ``{% generation %}`` block (assistant masks): parsed as its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> _nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return _nodes.Scope(body, lineno=lineno)

    # Configured like transformers' renderer so that every template it accepts parses.
    _ENV: Environment | None = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[LoopControlExtension, _GenerationTag],
    )
except ImportError:  # pragma: no cover - exercised by the no-jinja2 test in a subprocess
    _ENV = None

TEMPLATE_KEY = "tokenizer.chat_template"
_MAX_HITS = 40  # per template; a payload is clear long before that
_HEAD_MARKERS = ("{%", "{{", "{#")


def is_template_key(key: str) -> bool:
    """GGUF keys holding chat templates: the default and named ones (``.tool_use``)."""
    return key == TEMPLATE_KEY or key.startswith(TEMPLATE_KEY + ".")


def have_parser() -> bool:
    return _ENV is not None


def analyse_template(source: str, limits: Limits) -> list[Hit]:
    """Everything suspicious in one chat template, most severe first."""
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
    if _ENV is None:
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
        hits = _parsed(source, limits)
    unique = {(h.rule, h.evidence.get("line", ""), h.token): h for h in hits}
    ordered = sorted(unique.values(), key=lambda h: -h.severity)
    if len(ordered) <= _MAX_HITS:
        return ordered
    rest = ordered[_MAX_HITS:]
    worst = rest[0].rule  # the most severe of those left out, so the verdict holds
    return [*ordered[:_MAX_HITS], Hit(worst, f"{len(rest)} more findings not listed", "more")]


def _parsed(source: str, limits: Limits) -> list[Hit]:
    assert _ENV is not None
    try:
        tree = _ENV.parse(source)
    except TemplateSyntaxError as exc:
        lines = source.splitlines()
        hits = [
            hit("TG904", f"does not parse as Jinja: {exc.message}", lines, exc.lineno, "syntax")
        ]
        return hits + list(token_scan(source, "token scan of an unparseable template"))
    except (RecursionError, MemoryError):
        return [
            Hit("TG904", "nested too deeply to parse", "depth"),
            *token_scan(source, "token scan of an unparseable template"),
        ]
    all_nodes, complete = _collect(tree, limits.max_template_nodes)
    lines = source.splitlines()
    analyser = template_ast.Analyser(lines, all_nodes)
    hits = analyser.run()
    hits += template_triggers.hidden_instructions(all_nodes, analyser, lines)
    if not complete:
        hits.append(
            Hit(
                "TG002",
                f"template has more than {limits.max_template_nodes:,} "
                "syntax nodes; the rest was not analysed",
                "nodes",
            )
        )
    return hits


def _collect(tree: nodes.Node, cap: int) -> tuple[list[nodes.Node], bool]:
    out: list[nodes.Node] = []
    for node in template_ast.walk(tree):
        if len(out) >= cap:
            return out, False
        out.append(node)
    return out, True


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
