"""Does a metadata string carry code?  (safetensors ``__metadata__``, GGUF strings.)

Metadata is free text that formats never execute; the risk is a loader or a
pipeline that decodes it (``pickle.loads(base64...)``, ``eval``, a shell).  The
patterns are chosen to be rare in prose: model cards say "PyTorch" or "python",
not ``__import__('os')`` or ``curl ... | sh``.
"""

from __future__ import annotations

import base64
import binascii
import re

# A pickle begins with PROTO 2-5, or (protocol 0/1) with a GLOBAL opcode naming
# a module and a name, followed by the opcode that uses them.
_PICKLE_HEAD = re.compile(rb"\A(?:\x80[\x02-\x05]|c[A-Za-z_][\w.]*\n[A-Za-z_]\w*\n[(pq)SVN])")
_B64_RUN = re.compile(r"[A-Za-z0-9+/_-]{24,}={0,2}")
_MAX_B64_RUNS = 32
_MAX_B64_DECODE = 64 * 1024

_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "Python dunder access",
        re.compile(
            r"__(?:import|builtins|globals|subclasses|reduce|reduce_ex|class|mro|bases|base"
            r"|getattribute)__"
        ),
    ),
    (
        "a Python import",
        re.compile(
            r"(?m)^\s*(?:import\s+(?:os|sys|subprocess|socket|ctypes)"
            r"\b|from\s+(?:os|subprocess|socket|ctypes)\s+import\b)"
        ),
    ),
    (
        "a call that runs code",
        re.compile(
            r"\b(?:os\.(?:system|popen|exec\w*|spawn\w*)|subprocess\.\w+|eval|exec|compile"
            r"|pickle\.loads?|marshal\.loads|importlib\.import_module)\s*\("
        ),
    ),
    (
        "a shell command",
        re.compile(
            r"(?:/bin/(?:ba|z|da)?sh\b|\b(?:ba|z)?sh\s+-c\s|\b(?:curl|wget)\b[^\n|]{0,200}\|\s*"
            r"(?:sudo\s+)?(?:ba|z)?sh\b|\bnc\s+(?:-\w+\s+)*-e\s|\bpowershell(?:\.exe)?\s+-e"
            r"|\brm\s+-rf\s+[/~])"
        ),
    ),
)


def code_like(text: str) -> tuple[str, str] | None:
    """``(what, excerpt)`` for the first code-like thing in ``text``, else None."""
    raw = text.encode("latin-1", "replace")
    if _PICKLE_HEAD.match(raw):
        return "a raw pickle", text[:80]
    for what, pattern in _PATTERNS:
        m = pattern.search(text)
        if m:
            return what, _excerpt(text, m.start(), m.end())
    for i, m in enumerate(_B64_RUN.finditer(text)):
        if i >= _MAX_B64_RUNS:
            break
        decoded = _b64(m.group()[:_MAX_B64_DECODE])
        if decoded is None:
            continue
        if _PICKLE_HEAD.match(decoded):
            return "a base64-encoded pickle", _excerpt(text, m.start(), m.end())
        inner = decoded.decode("utf-8", "replace")
        for what, pattern in _PATTERNS:
            if pattern.search(inner):
                return f"base64-encoded {what}", _excerpt(text, m.start(), m.end())
    return None


def _b64(run: str) -> bytes | None:
    run = run.rstrip("=")
    run = run[: len(run) - len(run) % 4]
    if len(run) < 16:
        return None
    alphabet = base64.urlsafe_b64decode if ("-" in run or "_" in run) else base64.b64decode
    try:
        return alphabet(run)
    except (binascii.Error, ValueError):
        return None


def _excerpt(text: str, start: int, end: int, width: int = 60) -> str:
    lo = max(0, start - width)
    hi = min(len(text), max(end, start + width) + width)
    return ("..." if lo else "") + text[lo:hi] + ("..." if hi < len(text) else "")
