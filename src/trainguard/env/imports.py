"""Would installed code import a module that no distribution owns?

A module planted in a site folder under the name of an optional dependency
(``apex``, ``flash_attn``, a backend that ``torch`` tries when present) runs
as soon as the package that looks for it is imported: nothing is shadowed,
so the shadow check cannot see it, yet it is code that runs in training.  So
every unlisted importable file is given the module names it makes importable,
and the installed distributions' own ``.py`` files are read, statically
(:mod:`ast`, never imported), for a reference to one of them: an ``import``
statement (anywhere, also inside ``try`` or a function), a relative import
resolved against the file's package, or a string constant passed to a call
(``importlib.import_module("apex")``, ``find_spec("apex")``, helpers such as
``is_package_available("apex")``).  Over-approximating is the safe side: the
module is unowned code either way, and only its severity depends on this.

Bounded: only files whose bytes mention the name are parsed; a file too large
to parse, or that does not parse, counts as a reference when its bytes
mention the name (fail closed).
"""

from __future__ import annotations

import ast
import os
import re
import stat
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.machinery import EXTENSION_SUFFIXES, SOURCE_SUFFIXES

# Larger .py files are not parsed: their bytes alone decide (a mention counts).
MAX_PARSE_BYTES = 4 * 1024 * 1024
# Larger files are not read at all, and count as a reference (fail closed).
MAX_READ_BYTES = 64 * 1024 * 1024
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NOCTTY", 0)
)
# Only sources and extension modules: a sourceless top-level .pyc is the pyc
# check's (TG611, already high), and __pycache__ entries are never on the path.
_IMPORTABLE = (*EXTENSION_SUFFIXES, *SOURCE_SUFFIXES)
MAX_STDLIB_FILES = 20_000
# Below the standard library folder but not part of it.
_NOT_STDLIB = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests"})
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


@dataclass(frozen=True)
class Importer:
    """Where installed code refers to a module name."""

    file: str
    line: int  # 0 when the file was not parsed
    how: str  # "import apex", "call with 'apex'", "mentions 'apex' (not parsed: ...)"


def module_parts(path: str, root: str) -> list[str] | None:
    """The dotted name ``path`` would be imported as from ``root``, as parts; None when
    it is not an importable module there."""
    rel = os.path.relpath(path, root)
    if rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        return None
    parts = rel.split(os.sep)
    name = parts[-1]
    stem = next((name[: -len(s)] for s in _IMPORTABLE if name.endswith(s)), None)
    if stem is None:
        return None
    parts = parts[:-1] if stem == "__init__" else [*parts[:-1], stem]
    if not parts or not all(p.isidentifier() for p in parts):
        return None
    return parts


def owned_folders(owned: Iterable[str], roots: Iterable[str]) -> set[str]:
    """Every folder that holds a file some RECORD lists, up to the roots."""
    stop = set(roots)
    out: set[str] = set()
    for path in owned:
        folder = os.path.dirname(path)
        while folder not in out and folder not in stop and os.path.dirname(folder) != folder:
            out.add(folder)
            folder = os.path.dirname(folder)
    return out


def names_made_importable(path: str, root: str, owned: set[str]) -> list[str]:
    """The module names through which importing runs ``path``: its own, and each
    enclosing package that no distribution owns (importing ``apex`` runs a planted
    ``apex/__init__.py``, and makes a planted namespace ``apex/`` with its modules
    importable)."""
    parts = module_parts(path, root)
    if parts is None:
        return []
    names = [".".join(parts)]
    for depth in range(1, len(parts)):
        if os.path.join(root, *parts[:depth]) not in owned:
            names.append(".".join(parts[:depth]))
    return names


def _package_of(path: str, root: str) -> list[str] | None:
    parts = module_parts(path, root)
    if parts is None:
        return None
    return parts if os.path.basename(path).startswith("__init__.") else parts[:-1]


def references(tree: ast.AST, package: list[str] | None) -> list[tuple[str, int, str]]:
    """(module name, line, how) for every import and string constant passed to a call."""
    out: list[tuple[str, int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno, f"import {a.name}") for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                if package is None or node.level - 1 > len(package):
                    continue
                kept = package[: len(package) - (node.level - 1)]
                base = ".".join([*kept, *([base] if base else [])])
            if not base:
                continue
            how = f"from {'.' * node.level}{node.module or ''} import ..."
            out.append((base, node.lineno, how))
            out.extend((f"{base}.{a.name}", node.lineno, how) for a in node.names)
        elif isinstance(node, ast.Call):
            # Also strings inside the arguments: ".".join(["tzdata.zoneinfo", *parts])
            # is how zoneinfo asks for tzdata.
            for arg in [*node.args, *(k.value for k in node.keywords)]:
                for leaf in ast.walk(arg):
                    if (
                        isinstance(leaf, ast.Constant)
                        and isinstance(leaf.value, str)
                        and len(leaf.value) < 256
                        and _DOTTED.match(leaf.value)
                    ):
                        out.append((leaf.value, node.lineno, f"call with {leaf.value!r}"))
    return out


def _read(path: str) -> bytes | str | None:
    """The file's bytes, or why they were not read (None: it is not there)."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_size > MAX_READ_BYTES:
            return f"larger than {MAX_READ_BYTES} bytes"
        chunks: list[bytes] = []
        total = 0
        while total <= MAX_READ_BYTES:
            chunk = os.read(fd, 1024 * 1024)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)[: MAX_READ_BYTES + 1]
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(fd)


def stdlib_sources(folders: Iterable[str]) -> list[tuple[str, str]]:
    """The standard library's ``.py`` files (path, folder): ``lzma`` tries ``_lzma``, and
    a build without it gets whatever module of that name a site folder holds."""
    out: list[tuple[str, str]] = []
    for root in folders:
        pending = [root]
        while pending and len(out) < MAX_STDLIB_FILES:
            folder = pending.pop()
            try:
                with os.scandir(folder) as it:
                    for item in it:
                        if item.is_dir(follow_symlinks=False):
                            if item.name not in _NOT_STDLIB:
                                pending.append(item.path)
                        elif item.name.endswith(".py") and item.is_file(follow_symlinks=False):
                            out.append((item.path, root))
            except OSError:
                continue  # a folder that cannot be listed imports nothing we could read
    return out


class _Sieve:
    """Which files may refer to one module name, from their bytes: a superset of what
    :func:`references` finds, so that only those files are parsed.  A common name
    (``utils``) appears in thousands of files; only a few import it or pass it as a
    string, and only a file inside the same top-level package can import it relatively.
    """

    def __init__(self, name: str) -> None:
        parent, _, last = name.rpartition(".")
        self.top = name.partition(".")[0]
        self.last = last.encode()
        self.dotted = name.encode()
        # N itself, not the tail of a.N or of N_more
        self.exact = re.compile(rb"(?<![\w.])" + re.escape(self.dotted) + rb"(?![\w])")
        self.parent = b"from " + parent.encode() + b" import" if parent else None

    def _direct(self, data: bytes) -> bool:
        """``import N``, ``from N...``, ``import a, N``, or "N"/"N.x" in quotes."""
        for match in self.exact.finditer(data):
            start = match.start()
            before = data[start - 1 : start]
            after = data[match.end() : match.end() + 1]
            if before in (b"'", b'"') and after in (b"'", b'"', b"."):
                return True
            # Anywhere on the line before it: "try: import N", "x = 1; from N import y".
            line = data[data.rfind(b"\n", 0, start) + 1 : start]
            if b"import" in line or b"from" in line:
                return True
        return False

    def may_refer(self, data: bytes, path: str, root: str) -> bool:
        if self.last not in data:
            return False
        if self.dotted in data and self._direct(data):
            return True
        if self.parent is not None and self.parent in data:
            return True  # from parent import last (perhaps in parentheses)
        # A relative import names no package: only files inside the same one can.
        inside = path.startswith(os.path.join(root, self.top) + os.sep)
        return inside and b"from ." in data


def find_importers(names: set[str], sources: Iterable[tuple[str, str]]) -> dict[str, Importer]:
    """For each of ``names``, the first installed source file (path, its site folder)
    that refers to it, or to a module below it."""
    found: dict[str, Importer] = {}
    sieves = {name: _Sieve(name) for name in names}
    for path, root in sources:
        wanted = names - found.keys()
        if not wanted:
            break
        data = _read(path)
        if data is None:
            continue  # missing: the RECORD check reports it
        if isinstance(data, str):
            for name in wanted:  # unreadable: it may import anything (fail closed)
                found[name] = Importer(path, 0, f"could not be read ({data})")
            continue
        mentioned = {n for n in wanted if sieves[n].may_refer(data, path, root)}
        if not mentioned:
            continue
        problem = None
        tree: ast.AST | None = None
        if len(data) > MAX_PARSE_BYTES:
            problem = f"larger than {MAX_PARSE_BYTES} bytes"
        else:
            try:
                with warnings.catch_warnings():
                    # Old escapes and the like: what the source says is what matters here.
                    warnings.simplefilter("ignore")
                    tree = ast.parse(data, filename=path)
            except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
                problem = type(exc).__name__
        if tree is None:
            for name in mentioned:
                found[name] = Importer(path, 0, f"mentions {name!r} (not parsed: {problem})")
            continue
        for ref, line, how in references(tree, _package_of(path, root)):
            for name in mentioned - found.keys():
                if ref == name or ref.startswith(name + "."):
                    found[name] = Importer(path, line, how)
    return found


# Calls through which a package imports modules it finds, or names at run time.
_LISTING = frozenset({"iter_modules", "walk_packages"})
_COMPUTED = frozenset({"import_module", "__import__"})


def computed_import(tree: ast.AST) -> tuple[int, str] | None:
    """(line, how) of the first import by a name the code computes, or of a listing of
    modules (``pkgutil.iter_modules(__path__)``): a plugin folder, whose every module is
    imported whatever its name."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in _LISTING:
            return node.lineno, f"{name}(...) lists the modules it imports"
        first = node.args[0] if node.args else None
        if name in _COMPUTED and first is not None and not isinstance(first, ast.Constant):
            return node.lineno, f"{name}() of a computed name"
    return None


def plugin_importers(folders: set[str], sources: Iterable[tuple[str, str]]) -> dict[str, Importer]:
    """For each of ``folders`` (installed package folders that hold an unlisted module),
    an installed source right in it that imports modules by computed name, if any."""
    found: dict[str, Importer] = {}
    needles = [n.encode() for n in (*_LISTING, *_COMPUTED)]
    for path, _root in sources:
        folder = os.path.dirname(path)
        if folder not in folders or folder in found:
            continue
        data = _read(path)
        if not isinstance(data, bytes) or not any(n in data for n in needles):
            continue
        if len(data) > MAX_PARSE_BYTES:
            found[folder] = Importer(
                path, 0, f"may import by computed name (not parsed: over {MAX_PARSE_BYTES} bytes)"
            )
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(data, filename=path)
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            found[folder] = Importer(
                path, 0, f"may import by computed name (not parsed: {type(exc).__name__})"
            )
            continue
        hit = computed_import(tree)
        if hit is not None:
            found[folder] = Importer(path, hit[0], hit[1])
    return found


def host_folder(path: str, root: str, owned: set[str]) -> str | None:
    """The innermost installed package folder that holds ``path`` (below ``root``)."""
    folder = os.path.dirname(path)
    while folder.startswith(root + os.sep):
        if folder in owned:
            return folder
        folder = os.path.dirname(folder)
    return None
