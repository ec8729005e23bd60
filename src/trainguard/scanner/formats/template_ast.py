"""The checks run on a parsed chat template's Jinja AST (needs jinja2).

Nothing here renders or compiles: the tree comes from ``Environment.parse``
and is only walked.  Names that a template builds from pieces
(``'__cla' ~ 'ss__'``, ``{% set a = '_' * 2 %}``) are folded back into
constants first, so splitting a dunder across strings does not hide it; names
that cannot be folded are reported as unverifiable (TG905), never as safe.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from jinja2 import nodes
from jinja2.sandbox import (
    MAX_RANGE,
    UNSAFE_ASYNC_GENERATOR_ATTRIBUTES,
    UNSAFE_COROUTINE_ATTRIBUTES,
    UNSAFE_GENERATOR_ATTRIBUTES,
)

from trainguard.scanner.formats.template_rules import (
    CODE_CALLS,
    CODE_NAMES,
    GADGETS,
    MUTATORS,
    Hit,
    hit,
)

# Attribute names the sandbox refuses on any object, or on the objects that
# lead from a function to its globals (frames, code, generators).
_INTERNAL = frozenset(
    {
        "mro",
        "func_globals",
        "func_code",
        "im_func",
        "im_self",
        "im_class",
        "f_globals",
        "f_locals",
        "f_builtins",
        "f_back",
        "f_code",
        "tb_frame",
        "tb_next",
        "co_code",
        "os",
        "sys",
        "subprocess",
        "builtins",
        "modules",
        "importlib",
        *UNSAFE_GENERATOR_ATTRIBUTES,
        *UNSAFE_COROUTINE_ATTRIBUTES,
        *UNSAFE_ASYNC_GENERATOR_ATTRIBUTES,
    }
)
_DUNDER = re.compile(r"__[A-Za-z]\w*__")
_FORMAT_WALK = re.compile(r"\{[^{}]*?(?:\.\s*_|\[\s*_)")  # "{0.__class__}", "{0[_x]}"
_STRING_FILTERS = frozenset(
    {
        "lower",
        "upper",
        "reverse",
        "string",
        "trim",
        "title",
        "capitalize",
        "first",
        "last",
        "join",
        "replace",
    }
)
_MAX_FOLD_DEPTH = 64
_MAX_FOLDED = 4096  # characters: longer folded strings are not names anyway
Value = str | int

# Filters whose argument names an attribute path, and its positional index
# (jinja2.filters: map/sort/sum/unique/min/max take attribute= too).
_ATTRIBUTE_FILTERS = {
    "map": 99,
    "selectattr": 0,
    "rejectattr": 0,
    "groupby": 0,
    "sort": 2,
    "sum": 0,
    "unique": 1,
    "min": 1,
    "max": 1,
}


def internal_name(name: str) -> bool:
    """True for attribute names ``SandboxedEnvironment.is_safe_attribute`` refuses."""
    return name.startswith("_") or name in _INTERNAL


def _dunder_key(text: str) -> bool:
    """A string that, used as a key or attribute name, reaches Python internals."""
    return text in _INTERNAL or _DUNDER.fullmatch(text) is not None


@dataclass
class Analyser:
    lines: list[str]
    nodes_: list[nodes.Node]
    consts: dict[str, set[Value]] = field(default_factory=dict)
    hits: list[Hit] = field(default_factory=list)

    def run(self) -> list[Hit]:
        for _ in range(3):  # assignments may build on one another
            self._collect_constants()
        for node in self.nodes_:
            self._check(node)
        return self.hits

    # -- constant folding -------------------------------------------------------------

    def _collect_constants(self) -> None:
        for node in self.nodes_:
            if isinstance(node, nodes.Assign) and isinstance(node.target, nodes.Name):
                value = self.fold(node.node)
            elif isinstance(node, nodes.AssignBlock) and isinstance(node.target, nodes.Name):
                value = self._fold_body(node.body)
            else:
                continue
            if value is not None:
                self.consts.setdefault(node.target.name, set()).add(value)

    def _fold_body(self, body: list[nodes.Node]) -> str | None:
        parts: list[str] = []
        for stmt in body:
            if not isinstance(stmt, nodes.Output):
                return None
            for item in stmt.nodes:
                value = item.data if isinstance(item, nodes.TemplateData) else self.fold(item)
                if value is None:
                    return None
                parts.append(str(value))
        return "".join(parts)

    def fold(self, node: nodes.Node | None, depth: int = 0) -> Value | None:
        """The constant a string/int expression always evaluates to, if it has one."""
        value = self._fold(node, depth)
        if isinstance(value, str) and len(value) > _MAX_FOLDED:
            return None
        return value

    def _fold(self, node: nodes.Node | None, depth: int) -> Value | None:
        if node is None or depth > _MAX_FOLD_DEPTH:
            return None
        d = depth + 1
        if isinstance(node, nodes.Const):
            v = node.value
            return v if isinstance(v, (str, int)) and not isinstance(v, bool) else None
        if isinstance(node, nodes.TemplateData):
            return node.data
        if isinstance(node, nodes.Name) and node.ctx == "load":
            values = self.consts.get(node.name, set())
            return next(iter(values)) if len(values) == 1 else None
        if isinstance(node, nodes.Concat):
            parts = [self.fold(n, d) for n in node.nodes]
            return None if None in parts else "".join(str(p) for p in parts)
        if isinstance(node, (nodes.Add, nodes.Mul, nodes.Pow)):
            return _arith(node, self.fold(node.left, d), self.fold(node.right, d))
        if isinstance(node, nodes.Filter) and node.name in _STRING_FILTERS:
            return self._fold_filter(node, d)
        return None

    def _fold_filter(self, node: nodes.Filter, d: int) -> Value | None:
        args = [self.fold(a, d) for a in node.args]
        if None in args:
            return None
        if node.name == "join" and isinstance(node.node, (nodes.List, nodes.Tuple)):
            items = [self.fold(i, d) for i in node.node.items]
            sep = args[0] if args else ""
            return None if None in items else str(sep).join(str(i) for i in items)
        base = self.fold(node.node, d)
        if not isinstance(base, str):
            return None
        if node.name == "replace" and len(args) >= 2:
            return base.replace(str(args[0]), str(args[1]))
        simple: dict[str, Callable[[str], str]] = {
            "lower": str.lower,
            "upper": str.upper,
            "title": str.title,
            "capitalize": str.capitalize,
            "trim": str.strip,
            "string": str,
            "reverse": lambda s: s[::-1],
            "first": lambda s: s[:1],
            "last": lambda s: s[-1:],
        }
        fn = simple.get(node.name)
        return fn(base) if fn is not None else None

    # -- the checks -------------------------------------------------------------------

    def _add(self, rule: str, node: nodes.Node, message: str, token: str = "") -> None:
        self.hits.append(hit(rule, message, self.lines, node.lineno, token))

    def _check(self, node: nodes.Node) -> None:
        if isinstance(node, nodes.Name):
            self._check_name(node)
        elif isinstance(node, nodes.Getattr):
            self._check_key(node, node.node, node.attr, "attribute")
        elif isinstance(node, nodes.Getitem):
            key = self.fold(node.arg)
            if isinstance(key, str):
                self._check_key(node, node.node, key, "key")
            elif key is None and _builds_string(node.arg):
                self._add(
                    "TG905",
                    node,
                    "looks up a key computed at render time; the "
                    "sandbox would check it, a plain renderer will not",
                    "getitem",
                )
        elif isinstance(node, nodes.Filter):
            self._check_filter(node)
        elif isinstance(node, nodes.Call):
            self._check_call(node)
        elif isinstance(node, nodes.NSRef) and internal_name(node.attr):
            self._add(
                "TG901", node, f"assigns the attribute {node.attr!r}, a Python internal", node.attr
            )
        elif isinstance(node, nodes.Keyword) and _dunder_key(node.key):
            self._add(
                "TG901", node, f"keyword argument {node.key!r} names a Python internal", node.key
            )
        elif isinstance(node, (nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
            kind = type(node).__name__.lower()
            self._add(
                "TG905",
                node,
                f"uses {{% {kind} %}}, which reads other templates through the renderer's loader",
                kind,
            )
        if isinstance(
            node,
            (nodes.Const, nodes.TemplateData, nodes.Concat, nodes.Add, nodes.Mul, nodes.Filter),
        ):
            self._check_string(node)
        if isinstance(node, (nodes.Pow, nodes.Mul)):
            self._check_size(node)

    def _check_name(self, node: nodes.Name) -> None:
        if node.name in CODE_NAMES or node.name.startswith("__"):
            self._add(
                "TG901",
                node,
                f"refers to {node.name!r}, which only an escape from Jinja can reach",
                node.name,
            )
        elif node.name in GADGETS and node.ctx == "load":
            self._add(
                "TG905",
                node,
                f"uses the Jinja global {node.name!r}, which no chat "
                "template needs and which payloads use to reach Python globals",
                node.name,
            )

    def _check_key(self, node: nodes.Node, obj: nodes.Node, key: str, what: str) -> None:
        if internal_name(key) if what == "attribute" else _dunder_key(key):
            self._add(
                "TG901",
                node,
                f"reads the {what} {key!r}, a Python internal that "
                "leads to globals and builtins; a sandbox refuses it",
                key,
            )
        elif isinstance(obj, nodes.Name) and obj.name in GADGETS | {"namespace", "range", "dict"}:
            self._add(
                "TG901",
                node,
                f"reads {key!r} from the Jinja global {obj.name!r}, "
                "the first step of the known escapes",
                obj.name,
            )

    def _check_filter(self, node: nodes.Filter) -> None:
        name_arg: nodes.Node | None = None
        if node.name == "attr" and node.args:
            name_arg = node.args[0]
        elif node.name == "map" and len(node.args) >= 2 and self.fold(node.args[0]) == "attr":
            name_arg = node.args[1]
        if name_arg is None:
            self._check_attribute_filter(node)
            return
        key = self.fold(name_arg)
        if isinstance(key, str):
            if node.node is not None:
                self._check_key(node, node.node, key, "attribute")
            if key in ("format", "format_map"):
                self._add(
                    "TG905",
                    node,
                    f"fetches str.{key} through |attr, the shape of "
                    "known sandbox escapes (CVE-2024-56326)",
                    key,
                )
        else:
            self._add(
                "TG905",
                node,
                "reads an attribute whose name is computed at render "
                "time (|attr with a non-constant name)",
                "attr",
            )

    def _check_attribute_filter(self, node: nodes.Filter) -> None:
        """Filters that walk a (dotted) attribute path named by an argument: map, sort, ...

        jinja2's ``make_attrgetter`` follows every dotted part ("__class__.__mro__")
        with the environment's getitem, which a plain Environment does not guard.
        """
        at = _ATTRIBUTE_FILTERS.get(node.name or "")
        if at is None:
            return
        arg: nodes.Node | None = node.args[at] if len(node.args) > at else None
        for kw in node.kwargs:
            if kw.key == "attribute":
                arg = kw.value
        if arg is None:
            return
        key = self.fold(arg)
        if isinstance(key, int):
            return
        if not isinstance(key, str):
            self._add(
                "TG905",
                node,
                f"|{node.name} walks an attribute path computed at render time",
                node.name or "filter",
            )
            return
        for part in key.split("."):
            self._check_key(node, node.node if node.node is not None else node, part, "attribute")

    def _check_call(self, node: nodes.Call) -> None:
        callee = node.node
        if isinstance(callee, nodes.Getattr):
            if callee.attr in CODE_CALLS:
                self._add(
                    "TG901",
                    node,
                    f"calls .{callee.attr}(), which runs a command or code",
                    callee.attr,
                )
            elif callee.attr in MUTATORS:
                self._add(
                    "TG905",
                    node,
                    f"calls .{callee.attr}(), which mutates a list or "
                    "dict; an immutable sandbox refuses it",
                    callee.attr,
                )
            elif callee.attr in ("format", "format_map") and not isinstance(
                self.fold(callee.node), str
            ):
                self._add(
                    "TG905",
                    node,
                    f"calls str.{callee.attr} on a string built at "
                    "render time; format fields can walk attributes",
                    callee.attr,
                )
        elif isinstance(callee, nodes.Name) and callee.name == "range":
            for arg in node.args:
                value = self.fold(arg)
                huge = isinstance(value, int) and abs(value) > MAX_RANGE
                if huge or any(True for _ in arg.find_all(nodes.Pow)):
                    self._add(
                        "TG905",
                        node,
                        f"builds a range larger than the sandbox's "
                        f"{MAX_RANGE} items (a denial of service)",
                        "range",
                    )
                    break

    def _check_string(self, node: nodes.Node) -> None:
        value = self.fold(node)
        if not isinstance(value, str):
            return
        text = value.strip()
        if _DUNDER.fullmatch(text):
            self._add(
                "TG901", node, f"builds the string {text!r}, the name of a Python internal", text
            )
        elif _FORMAT_WALK.search(value):
            self._add(
                "TG901",
                node,
                "holds a str.format field that walks into private attributes",
                "format",
            )

    def _check_size(self, node: nodes.Pow | nodes.Mul) -> None:
        left, right = self.fold(node.left), self.fold(node.right)
        if isinstance(node, nodes.Pow) and isinstance(right, int) and right > 64:
            self._add("TG905", node, f"raises to the power {right} (a denial of service)", "pow")
        elif isinstance(node, nodes.Mul) and any(
            isinstance(v, int) and v > 10**6 for v in (left, right)
        ):
            self._add(
                "TG905", node, "multiplies by more than a million (a denial of service)", "mul"
            )


def _arith(node: nodes.BinExpr, a: Value | None, b: Value | None) -> Value | None:
    if a is None or b is None:
        return None
    if isinstance(node, nodes.Add):
        if isinstance(a, str) and isinstance(b, str):
            return a + b
        return a + b if isinstance(a, int) and isinstance(b, int) else None
    if isinstance(node, nodes.Mul):
        if isinstance(a, int) and isinstance(b, int):
            return a * b if abs(a) < 1 << 32 and abs(b) < 1 << 32 else None
        s, n = (a, b) if isinstance(a, str) else (b, a)
        if isinstance(s, str) and isinstance(n, int) and 0 <= n * len(s) <= _MAX_FOLDED:
            return s * n
        return None
    if isinstance(a, int) and isinstance(b, int) and 0 <= b <= 64 and abs(a) < 1 << 16:
        return int(a**b)
    return None


def _builds_string(node: nodes.Node) -> bool:
    """An expression that computes a string (rather than naming or indexing one)."""
    if isinstance(node, (nodes.Concat, nodes.Filter, nodes.Call, nodes.CondExpr, nodes.Mod)):
        return True
    if isinstance(node, (nodes.Add, nodes.Mul)):
        return (
            any(
                isinstance(n, nodes.Const) and isinstance(n.value, str)
                for n in (node.left, node.right)
            )
            or _builds_string(node.left)
            or _builds_string(node.right)
        )
    return False


def walk(node: nodes.Node) -> Iterator[nodes.Node]:
    """``node`` and everything under it, in source order, without recursion."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(reversed(list(n.iter_child_nodes())))
