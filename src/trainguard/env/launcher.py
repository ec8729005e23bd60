"""Console scripts are written at install time: check what they can do, not their bytes.

pip, uv and installer each write their own launcher for a ``console_scripts``
entry point, so there is no reference file to compare with.  What all of them
write is the same program: a shebang naming this environment's interpreter,
``import re``/``import sys``, one ``from MODULE import NAME``, and a
``__main__`` block that tidies ``sys.argv[0]`` and calls ``sys.exit(NAME())``.
:func:`launcher_problem` checks a script against that shape, with the module
and object its entry point declares, so a launcher edited to import or call
anything else fails whatever tool wrote it.
"""

from __future__ import annotations

import ast
import configparser
import os
import re
import sys

MAX_SCRIPT_BYTES = 64 * 1024
_PYTHON = re.compile(r"python[0-9.]*w?(\.exe)?")
# What a launcher may name besides its entry point, and call.
_NAMES = {"re", "sys", "__name__"}
_ATTRS = {"argv", "exit", "sub", "removesuffix"}
_NODES = (
    ast.Module,
    ast.Import,
    ast.ImportFrom,
    ast.alias,
    ast.If,
    ast.Compare,
    ast.Eq,
    ast.Expr,
    ast.Assign,
    ast.Call,
    ast.Name,
    ast.Attribute,
    ast.Subscript,
    ast.Constant,
    ast.Load,
    ast.Store,
)


def entry_points(text: str) -> dict[str, str]:
    """Script name -> ``module:object`` of an ``entry_points.txt``'s ``console_scripts``
    and ``gui_scripts`` (empty when it does not parse)."""
    parser = configparser.ConfigParser(delimiters=("=",), interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # names keep their case
    try:
        parser.read_string(text)
    except configparser.Error:
        return {}
    out: dict[str, str] = {}
    for section in ("console_scripts", "gui_scripts"):
        if parser.has_section(section):
            out.update((k, v.split("[")[0].strip()) for k, v in parser.items(section))
    return out


def interpreter_problem(line: str, script: str) -> str | None:
    """The shebang must name this environment's interpreter: one beside the script
    (a venv's bin/) or the one running trainguard."""
    command = line[2:].strip()
    if command.startswith('"'):
        command = command[1:].partition('"')[0]
    else:
        command = command.split()[0] if command.split() else ""
    if not _PYTHON.fullmatch(os.path.basename(command)):
        return f"its shebang runs {command[:120]!r}, not a Python interpreter"
    # A venv's launchers name the python beside them; pip --prefix/--target and system
    # installs name the interpreter that ran pip, which is the one verifying (or the
    # same binary: a system python and its /usr/bin/python3 link).
    if os.path.dirname(command) == os.path.dirname(script) or command == sys.executable:
        return None
    if os.path.realpath(command) == os.path.realpath(sys.executable):
        return None
    return f"its shebang runs {command[:120]!r}, not this environment's interpreter"


def body_after_shebang(data: bytes) -> tuple[str, bytes] | None:
    """(the interpreter line, the rest) of a script, past pip's ``/bin/sh`` trampoline
    for long interpreter paths; None when there is no shebang."""
    if not data.startswith(b"#!"):
        return None
    first, _, rest = data.partition(b"\n")
    if first.strip() == b"#!/bin/sh" and rest.startswith(b"'''exec' "):
        exec_line, _, after = rest.partition(b"\n")
        closing, _, body = after.partition(b"\n")
        if closing.strip() == b"' '''":
            words = exec_line.decode("utf-8", "replace").split('"')
            return ("#!" + (words[1] if len(words) > 1 else ""), body)
    return first.decode("utf-8", "replace"), rest


def launcher_problem(path: str, data: bytes, target: str) -> str | None:
    """Why ``data`` (the script at ``path``) is not a launcher for ``target``
    (``module:object``), or None."""
    if len(data) > MAX_SCRIPT_BYTES:
        return "larger than any launcher"
    split = body_after_shebang(data)
    if split is None:
        return "no shebang"
    problem = interpreter_problem(split[0], path)
    if problem is not None:
        return problem
    module, _, obj = target.partition(":")
    parts = obj.split(".") if obj else []
    if not module or not parts:
        return f"its entry point {target!r} is not module:object"
    try:
        tree = ast.parse(split[1])
    except (SyntaxError, ValueError, RecursionError):
        return "not Python a launcher is made of"
    imported = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    if len(imported) != 1 or imported[0].level or imported[0].module != module:
        return f"it does not import exactly {module}"
    if [(a.name, a.asname) for a in imported[0].names] != [(parts[0], None)]:
        return f"it imports something other than {parts[0]} from {module}"
    calls = 0
    for node in ast.walk(tree):
        if not isinstance(node, _NODES):
            return f"it holds a {type(node).__name__}, which no launcher has"
        if isinstance(node, ast.Import) and {a.name for a in node.names} - {"re", "sys"}:
            return "it imports more than re and sys"
        if isinstance(node, ast.Name) and node.id not in _NAMES | {parts[0]}:
            return f"it names {node.id!r}"
        if isinstance(node, ast.Attribute) and node.attr not in _ATTRS | set(parts[1:]):
            return f"it reaches .{node.attr}"
        if isinstance(node, ast.Call) and ast.unparse(node.func) == ".".join(parts):
            calls += 1
    if calls != 1:
        return f"it calls {obj} {calls} times"
    return None
