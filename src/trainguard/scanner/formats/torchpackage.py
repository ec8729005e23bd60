"""torch.package archives: the Python modules they ship are code that runs.

``torch.package.PackageImporter`` imports the archive's own ``.py`` members
(module-level code runs) whenever ``import_module`` names one or ``load_pickle``
meets a class from one.  So an archive that ships modules is code by design:
TG114 high unless the user's policy trusts it (or suppresses the rule), and
critical when a module reaches what no model definition needs at import or
call time: running code (``exec``, ``eval``, ``__import__``), the operating
system (``os``, ``subprocess``, ``ctypes``...), writing files (``open`` for
writing, ``pathlib``'s writers) or the network.  The modules are parsed with
:mod:`ast` only, never compiled or imported; text that does not parse is high.
The archive is recognised the way ``PackageImporter`` opens it: by its
``.data/extern_modules`` record.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from typing import BinaryIO

from trainguard.findings import Finding, Severity
from trainguard.rules import finding
from trainguard.scanner import ziplenient
from trainguard.scanner.base import Blob, ScanContext

_MAX_CODE = 16 << 20
_RUNS_CODE = frozenset(["exec", "eval", "compile", "__import__", "breakpoint", "execfile"])
_SYSTEM_MODULES = frozenset(
    """
    os posix nt subprocess pty ctypes cffi shutil socket ssl http urllib urllib3 requests
    httpx ftplib smtplib telnetlib asyncio multiprocessing importlib runpy pickle marshal
    dill cloudpickle builtins sys signal webbrowser code codeop tempfile glob pathlib io
    """.split()
)
_FILE_WRITERS = frozenset(
    """
    write_text write_bytes touch mkdir makedirs unlink rmdir rename replace symlink_to
    hardlink_to chmod remove removedirs system popen spawnl spawnv execv execve
    """.split()
)

# Attribute walks from an object to the interpreter (the usual escape to builtins).
_INTROSPECTION = frozenset(
    """
    __globals__ __builtins__ __subclasses__ __code__ __reduce__ __reduce_ex__
    __getattribute__ __import__ __class__ __bases__ __mro__ __loader__ __spec__
    """.split()
)


class TorchPackageFlavour:
    name = "torch.package"

    def matches(self, names: frozenset[str]) -> bool:
        return any(
            n == ".data/extern_modules" or n.endswith("/.data/extern_modules") for n in names
        )

    def scan(
        self, ctx: ScanContext, blob: Blob, f: BinaryIO, directory: ziplenient.ZipDirectory
    ) -> Iterator[Finding]:
        for entry in directory.entries:
            if not entry.name.endswith(".py"):
                continue
            member = f"{blob.name}/{entry.name}" if blob.name else entry.name
            if entry.size > _MAX_CODE:
                yield _ships(member, Severity.HIGH, f"a module of {entry.size} bytes")
                continue
            with ziplenient.open_member(f, entry, ctx.limits) as m:
                text = m.read(_MAX_CODE).decode("utf-8", "replace")
            yield _judge(text, member)


def _ships(member: str, severity: Severity, why: str, line: int = 0) -> Finding:
    return finding(
        "TG114",
        f"torch.package archive ships a Python module that runs when the archive loads it: {why}",
        member=member,
        severity=severity,
        evidence={"line": str(line)} if line else None,
    )


def _judge(text: str, member: str) -> Finding:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return _ships(member, Severity.HIGH, f"text that does not parse ({exc})")
    try:
        for node in ast.walk(tree):
            reach = _reaches(node)
            if reach:
                line = getattr(node, "lineno", 0)
                return _ships(member, Severity.CRITICAL, reach, line)
    except RecursionError:
        return _ships(member, Severity.HIGH, "a syntax tree too deep to walk")
    return _ships(member, Severity.HIGH, "no policy trusts this archive's code")


def _reaches(node: ast.AST) -> str:
    """What ``node`` reaches beyond model arithmetic, or ""."""
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = [a.name for a in node.names]
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        for name in names:
            if name.split(".")[0] in _SYSTEM_MODULES:
                return f"it imports {name}"
    elif isinstance(node, ast.Name) and node.id in _RUNS_CODE | {"open", "getattr"}:
        return f"it uses {node.id}"
    elif isinstance(node, ast.Attribute) and node.attr in _FILE_WRITERS | _RUNS_CODE:
        return f"it calls .{node.attr}"
    elif isinstance(node, ast.Attribute) and node.attr in _INTROSPECTION:
        return f"it reaches {node.attr}"
    return ""
