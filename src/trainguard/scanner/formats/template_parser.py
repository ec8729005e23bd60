"""Chat-template analysis on jinja2's own parse tree (needs the ``templates`` extra).

Imported lazily by :mod:`templates`.  ``Environment.parse`` only lexes and
parses: nothing is compiled or rendered.
"""

from __future__ import annotations

# jinja2's lexer decodes string literals with this codec, which Python loads lazily;
# load it now: a scan itself never imports anything (tests/test_no_execution.py).
import encodings.unicode_escape  # noqa: F401
from typing import Any

from jinja2 import Environment, TemplateSyntaxError, nodes
from jinja2.ext import Extension, LoopControlExtension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from trainguard.limits import Limits
from trainguard.scanner.formats import template_ast, template_triggers
from trainguard.scanner.formats.template_rules import Hit, hit, token_scan


class _GenerationTag(Extension):
    """transformers' ``{% generation %}`` block (assistant masks): parsed as its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


# Configured like transformers' renderer so that every template it accepts parses.
_ENV: Environment = ImmutableSandboxedEnvironment(
    trim_blocks=True,
    lstrip_blocks=True,
    extensions=[LoopControlExtension, _GenerationTag],
)


def parsed(source: str, limits: Limits) -> list[Hit]:
    """Hits found by parsing ``source`` with jinja2 and walking its tree."""
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
