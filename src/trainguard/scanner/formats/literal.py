"""A reader for the small Python literals in file headers (numpy's .npy header).

Only str, int, float, bool, None, tuple, list and dict; nesting and length are
bounded.  Nothing is compiled or evaluated.
"""

from __future__ import annotations

import re

_MAX_DEPTH = 32
_TOKEN = re.compile(
    r"""\s*(?:(?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
    r"""|(?P<num>[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?L?)"""
    r"""|(?P<name>True|False|None)|(?P<punct>[()\[\]{}:,]))""",
    re.S,
)


class LiteralError(ValueError):
    pass


def _unquote(token: str) -> str:
    body = token[1:-1]
    if "\\" not in body:
        return body
    return body.encode("latin-1", "backslashreplace").decode("unicode_escape")


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def next(self) -> tuple[str, str]:
        m = _TOKEN.match(self.text, self.pos)
        if not m or m.end() == self.pos:
            snippet = self.text[self.pos : self.pos + 20]
            raise LiteralError(f"unexpected text at {self.pos}: {snippet!r}")
        self.pos = m.end()
        kind = m.lastgroup
        assert kind is not None
        return kind, m.group(kind)

    def peek(self) -> tuple[str, str]:
        here = self.pos
        tok = self.next()
        self.pos = here
        return tok

    def value(self, depth: int = 0) -> object:
        if depth > _MAX_DEPTH:
            raise LiteralError("literal nested too deeply")
        kind, tok = self.next()
        if kind == "str":
            return _unquote(tok)
        if kind == "num":
            tok = tok.rstrip("L")
            return float(tok) if any(c in tok for c in ".eE") else int(tok)
        if kind == "name":
            return {"True": True, "False": False, "None": None}[tok]
        if tok == "(":
            items = self._items(")", depth)
            return tuple(items)
        if tok == "[":
            return self._items("]", depth)
        if tok == "{":
            return self._dict(depth)
        raise LiteralError(f"unexpected {tok!r}")

    def _items(self, close: str, depth: int) -> list[object]:
        items: list[object] = []
        while True:
            if self.peek()[1] == close:
                self.next()
                return items
            items.append(self.value(depth + 1))
            tok = self.next()[1]
            if tok == close:
                return items
            if tok != ",":
                raise LiteralError(f"expected ',' or {close!r}, got {tok!r}")

    def _dict(self, depth: int) -> dict[object, object]:
        out: dict[object, object] = {}
        while True:
            if self.peek()[1] == "}":
                self.next()
                return out
            key = self.value(depth + 1)
            if self.next()[1] != ":":
                raise LiteralError("expected ':' in dict")
            val = self.value(depth + 1)
            if isinstance(key, (list, dict)):
                raise LiteralError("unhashable dict key")
            out[key] = val
            tok = self.next()[1]
            if tok == "}":
                return out
            if tok != ",":
                raise LiteralError(f"expected ',' or '}}', got {tok!r}")


def parse_literal(text: str) -> object:
    reader = _Reader(text)
    value = reader.value()
    if text[reader.pos :].strip():
        raise LiteralError("text after the literal")
    return value
