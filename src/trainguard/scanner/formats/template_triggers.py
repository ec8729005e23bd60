"""Hidden instructions: template branches that fire on a trigger in what users write.

A poisoned template can look like any other and still change the model's
behaviour for whoever knows a phrase: ``{% if 'ZX-7' in message.content %}``
followed by a system instruction that appears nowhere else.  Structural tests
are not triggers: comparing a role, looking for a key in a message object
(``'tool_calls' in message``), or for a tag whose branch emits no prose
(``'</think>' in content``, which only rewrites the content).
"""

from __future__ import annotations

from collections.abc import Iterator

from jinja2 import nodes

from trainguard.scanner.formats.template_ast import Analyser, walk
from trainguard.scanner.formats.template_rules import Hit, hit, quote

# Where a template reads what users wrote.
CONTENT_NAMES = frozenset(
    {"content", "prompt", "query", "text", "input", "user_input", "user_message", "last_message"}
)
CONTENT_KEYS = frozenset({"content", "text", "value"})
# Names that hold message objects or lists: content only once turned into text.
OBJECT_NAMES = frozenset({"message", "messages", "msg"})
# Comparing a role is structure, not a trigger.
ROLE_VALUES = frozenset(
    {
        "system",
        "user",
        "assistant",
        "tool",
        "tools",
        "ipython",
        "model",
        "function",
        "developer",
        "human",
        "gpt",
        "bot",
        "observation",
        "tool_calls",
    }
)
SEARCH_METHODS = frozenset({"startswith", "endswith", "find", "rfind", "index", "rindex", "count"})
_MAX_DEPTH = 64
_MIN_WORDS = 4  # an instruction, not a tag
_MAX_CANDIDATES = 64  # trigger-tested branches examined per template


def hidden_instructions(
    all_nodes: list[nodes.Node], analyser: Analyser, lines: list[str]
) -> list[Hit]:
    """TG902 for each branch that emits prose only when content holds a trigger."""
    everywhere = _normal(emitted_text(all_nodes[:1]))
    hits: list[Hit] = []
    candidates = 0
    for node in all_nodes:
        if not isinstance(node, nodes.If):
            continue
        trigger = content_trigger(node.test, analyser)
        if trigger is None:
            continue
        candidates += 1
        if candidates > _MAX_CANDIDATES:  # keeps adversarial templates linear
            break
        injected = _normal(emitted_text(node.body))
        if _words(injected) < _MIN_WORDS:
            continue
        if everywhere.count(injected) > 1:  # the template also says it outside this branch
            continue
        last = max((n.lineno for b in node.body for n in walk(b)), default=node.lineno)
        found = hit(
            "TG902",
            f"injects text only when a message contains {trigger!r}: {quote(injected, 120)!r}",
            lines,
            node.lineno,
            trigger,
        )
        branch = "\n".join(lines[node.lineno - 1 : last])
        hits.append(
            Hit(
                found.rule,
                found.message,
                found.token,
                {
                    **found.evidence,
                    "trigger": trigger,
                    "injected": quote(injected),
                    "branch": quote(branch, 600),
                },
            )
        )
    return hits


def content_trigger(test: nodes.Node, fold: Analyser) -> str | None:
    """The string a branch test looks for in message content, if it looks for one."""
    for node in walk(test):
        if isinstance(node, nodes.Compare):
            operands = [node.expr, *(op.expr for op in node.ops)]
            found = _trigger_among(operands, fold)
        elif (
            isinstance(node, nodes.Call)
            and isinstance(node.node, nodes.Getattr)
            and node.node.attr in SEARCH_METHODS
            and _is_content(node.node.node, fold)
        ):
            found = _trigger_among(node.args, fold, content_known=True)
        elif isinstance(node, nodes.Test) and node.name in ("in", "eq", "equalto", "=="):
            found = _trigger_among([node.node, *node.args], fold)
        else:
            found = None
        if found is not None:
            return found
    return None


def _trigger_among(
    operands: list[nodes.Expr], fold: Analyser, *, content_known: bool = False
) -> str | None:
    if not content_known and not any(_is_content(o, fold) for o in operands):
        return None
    for o in operands:
        value = fold.fold(o)
        if isinstance(value, str) and value.strip() and value.strip().lower() not in ROLE_VALUES:
            return value
    return None


def _is_content(node: nodes.Node, fold: Analyser, text: bool = False, depth: int = 0) -> bool:
    """Does ``node`` evaluate to what a user wrote?  ``text``: it is being stringified."""
    if depth > _MAX_DEPTH:
        return False
    d = depth + 1
    if isinstance(node, nodes.Name):
        name = node.name
        return name in CONTENT_NAMES or name.endswith("content") or (text and name in OBJECT_NAMES)
    if isinstance(node, nodes.Getattr):
        return node.attr in CONTENT_KEYS
    if isinstance(node, nodes.Getitem):
        key = fold.fold(node.arg)
        if isinstance(key, str):
            return key in CONTENT_KEYS
        return _is_content(node.node, fold, text, d)
    if isinstance(node, nodes.Filter):
        return node.node is not None and _is_content(node.node, fold, True, d)
    if isinstance(node, nodes.Call) and isinstance(node.node, nodes.Getattr):
        return _is_content(node.node.node, fold, True, d)
    if isinstance(node, nodes.Concat):
        return any(_is_content(n, fold, True, d) for n in node.nodes)
    return False


def emitted_text(body: list[nodes.Node]) -> list[str]:
    """Literal text a list of statements outputs (not call arguments or lookups)."""
    texts: list[str] = []
    for stmt in body:
        for out in walk(stmt):
            if isinstance(out, nodes.Output):
                for item in out.nodes:
                    texts.extend(_literals(item))
    return texts


def _literals(node: nodes.Node) -> Iterator[str]:
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, nodes.TemplateData):
            yield n.data
        elif isinstance(n, nodes.Const) and isinstance(n.value, str):
            yield n.value
        elif isinstance(n, (nodes.Concat, nodes.Add)):
            stack.extend(reversed(list(n.iter_child_nodes())))  # keep reading order
        elif isinstance(n, nodes.Filter) and n.node is not None:
            stack.append(n.node)
        elif isinstance(n, nodes.CondExpr):
            stack.extend(x for x in (n.expr2, n.expr1) if x is not None)


def _normal(texts: list[str]) -> str:
    return " ".join(" ".join(texts).split())


def _words(text: str) -> int:
    """Words of three or more letters (CJK characters count a word per three)."""
    latin = sum(1 for w in text.split() if w.isascii() and sum(c.isalpha() for c in w) >= 3)
    cjk = sum(1 for c in text if "\u3040" <= c <= "\u9fff") // 3
    return latin + cjk
