"""What chat-template analysis looks for, and the token scan used without a parse.

The name sets are shared by the AST checks (:mod:`template_ast`, which needs
jinja2) and by the token scan here, which runs when jinja2 is missing or the
template does not parse.  The token scan is deliberately conservative: it
flags dangerous words anywhere inside ``{{ }}`` / ``{% %}``, including in
string literals, and joins adjacent literals (``'__cla' ~ 'ss__'``) first.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from trainguard.findings import Severity
from trainguard.rules import RULES

# Names a template can only use if it has escaped Jinja into Python.
CODE_NAMES = frozenset(
    {
        "os",
        "sys",
        "eval",
        "exec",
        "compile",
        "open",
        "getattr",
        "setattr",
        "delattr",
        "globals",
        "locals",
        "importlib",
        "subprocess",
        "builtins",
        "__import__",
        "__builtins__",
    }
)
# Methods that run commands or load code.
CODE_CALLS = frozenset(
    {
        "system",
        "popen",
        "popen2",
        "popen3",
        "spawnl",
        "spawnlp",
        "spawnv",
        "spawnvp",
        "execl",
        "execle",
        "execlp",
        "execv",
        "execve",
        "execvp",
        "fork",
        "import_module",
        "check_output",
        "check_call",
        "getoutput",
        "getstatusoutput",
        "Popen",
        "eval",
        "exec",
        "load_module",
        "exec_module",
        "__import__",
    }
)
# Jinja globals that are the usual handles of published escapes.
GADGETS = frozenset({"lipsum", "cycler", "joiner", "self"})
# Methods ImmutableSandboxedEnvironment refuses (they mutate lists, dicts, sets, deques).
MUTATORS = frozenset(
    {
        "append",
        "appendleft",
        "extend",
        "extendleft",
        "insert",
        "pop",
        "popleft",
        "popitem",
        "remove",
        "clear",
        "update",
        "setdefault",
        "sort",
        "reverse",
        "rotate",
        "add",
        "discard",
        "difference_update",
        "symmetric_difference_update",
        "intersection_update",
    }
)
_MAX_SOURCE_QUOTE = 240


@dataclass(frozen=True)
class Hit:
    """One thing found in a template; the caller turns it into a :class:`Finding`."""

    rule: str
    message: str
    token: str = ""  # what matched, for de-duplication
    evidence: dict[str, str] = field(default_factory=dict)

    @property
    def severity(self) -> Severity:
        return RULES[self.rule].severity


def quote(text: str, limit: int = _MAX_SOURCE_QUOTE) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def hit(rule: str, message: str, lines: list[str], lineno: int, token: str = "") -> Hit:
    source = lines[lineno - 1] if 0 < lineno <= len(lines) else ""
    return Hit(rule, message, token, {"line": str(lineno), "source": quote(source)})


# -- the token scan -------------------------------------------------------------------

_BLOCK = re.compile(r"\{\{(.*?)\}\}|\{%(.*?)%\}", re.S)
_ADJACENT_LITERALS = re.compile(r"""(['"])\s*[~+]\s*(['"])""")
_TOKEN_RULES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    (
        "TG901",
        re.compile(
            r"__\w+__|\b(?:mro|f_globals|func_globals|gi_frame|tb_frame)\b"
            r"|\._\w"
        ),
        "a Python internal",
    ),
    (
        "TG901",
        re.compile(r"\b(?:" + "|".join(sorted(CODE_CALLS - {"eval", "exec"})) + r")\s*\("),
        "a call that runs commands or code",
    ),
    (
        "TG901",
        re.compile(
            r"\b(?:eval|exec|__import__|getattr|importlib|subprocess)\b"
            r"|\bos\s*\.|['\"]os['\"]"
        ),
        "code execution",
    ),
    ("TG901", re.compile(r"""['"]_+['"]\s*\*"""), "an underscore run built by repetition"),
    ("TG905", re.compile(r"\b(?:lipsum|cycler|joiner|self)\b"), "a Jinja gadget global"),
    ("TG905", re.compile(r"\|\s*attr\b"), "the attr filter"),
    ("TG905", re.compile(r"^\s*-?\s*(?:include|import|extends|from)\b"), "a template import"),
    (
        "TG905",
        re.compile(r"\.(?:" + "|".join(sorted(MUTATORS)) + r")\s*\("),
        "a list or dict mutation",
    ),
)


def token_scan(source: str, why: str) -> Iterator[Hit]:
    """Conservative matches inside Jinja blocks, each with its line; ``why`` says why."""
    lines = source.splitlines()
    for m in _BLOCK.finditer(source):
        code = m.group(1) if m.group(1) is not None else m.group(2) or ""
        joined = _ADJACENT_LITERALS.sub("", code)
        lineno = source.count("\n", 0, m.start()) + 1
        for rule, pattern, what in _TOKEN_RULES:
            found = pattern.search(joined)
            if found:
                yield hit(
                    rule,
                    f"contains {what} ({found.group().strip()!r}; {why})",
                    lines,
                    lineno,
                    found.group().strip(),
                )
