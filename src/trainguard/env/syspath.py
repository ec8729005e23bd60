"""The import roots ``site`` adds from the site folders' ``.pth`` files, and the code on them.

``site`` appends to ``sys.path`` every ``.pth`` path line that exists once joined to the
``.pth``'s folder: a folder (inside the site folder or anywhere), or a file (a zip that
``zipimport`` reads; any other file is kept on the path too).  Every such entry is a root
from which ``import NAME`` loads code, so "what would importing run" is asked of each of
them, not only of the site folders: ``_x/pynvml.py`` below a site folder is ``_x.pynvml``
from the site folder, which nothing imports, and ``pynvml`` from the root ``_x``, which
``torch`` imports when present.  Nothing here is imported or executed: folders are listed
and archives' member names read.
"""

from __future__ import annotations

import os
import sys
import zipfile
from dataclasses import dataclass
from importlib.machinery import BYTECODE_SUFFIXES, EXTENSION_SUFFIXES, SOURCE_SUFFIXES

from trainguard.env.pth import pth_files, read_pth
from trainguard.filestate import Identity

# A folder on the path is listed at its top level only; a larger one is named in the
# finding rather than listed in full.
MAX_ROOT_ENTRIES = 10_000
MAX_ZIP_MEMBERS = 100_000
_MODULE_SUFFIXES = (*EXTENSION_SUFFIXES, *SOURCE_SUFFIXES, *BYTECODE_SUFFIXES)
# Modules of this interpreter's standard library: a root holding one of these names is
# code taking a name the interpreter or installed code means as something else.
STDLIB_NAMES = frozenset(getattr(sys, "stdlib_module_names", ()))


@dataclass(frozen=True)
class PathRoot:
    """One ``sys.path`` entry a ``.pth`` path line adds."""

    path: str  # absolute, as site adds it
    pth: str  # the .pth file whose line adds it
    line: str
    is_file: bool  # an archive or other file, not a folder
    # The site folder whose walk lists its content; None: outside every site folder
    # (or reached through a link, which the walk does not follow).
    inside: str | None


def _walked_under(target: str, roots: list[str]) -> str | None:
    for root in roots:
        if target.startswith(root + os.sep):
            rel = os.path.relpath(target, root)
            # The walk follows no link: only a path whose every step is a real folder
            # is listed by it.
            if os.path.realpath(target) == os.path.join(os.path.realpath(root), rel):
                return root
    return None


def path_roots(roots: list[str]) -> tuple[list[PathRoot], dict[str, Identity]]:
    """Every entry the ``.pth`` files directly in ``roots`` add to ``sys.path``, as
    ``site.addpackage`` adds them (joined to the ``.pth``'s folder, kept when it exists,
    once each), and the stat of each ``.pth`` read."""
    known = {os.path.normcase(os.path.abspath(r)) for r in roots}
    out: list[PathRoot] = []
    keys: dict[str, Identity] = {}
    for root in roots:
        for path in pth_files(root):
            pth = read_pth(path)
            if pth.key is not None:
                keys[path] = pth.key
            for line in pth.path_lines:
                target = os.path.abspath(os.path.join(root, line.rstrip()))
                case = os.path.normcase(target)
                if case in known or not os.path.exists(target):
                    continue
                known.add(case)
                is_file = not os.path.isdir(target)
                inside = None if is_file else _walked_under(target, roots)
                out.append(PathRoot(target, path, line.rstrip(), is_file, inside))
    return out, keys


def module_stem(name: str) -> str | None:
    stem = next((name[: -len(s)] for s in _MODULE_SUFFIXES if name.endswith(s)), None)
    return stem if stem is not None and stem.isidentifier() else None


def folder_names(folder: str) -> tuple[list[tuple[str, str]], str | None]:
    """(top-level module name, its file or package folder) importable from ``folder``, and
    why the listing is incomplete (None: complete)."""
    out: list[tuple[str, str]] = []
    try:
        with os.scandir(folder) as it:
            for count, item in enumerate(it):
                if count >= MAX_ROOT_ENTRIES:
                    return out, f"more than {MAX_ROOT_ENTRIES} entries; the rest not listed"
                if item.is_dir():
                    # A package, or a namespace package: any identifier-named folder.
                    if item.name.isidentifier():
                        out.append((item.name, item.path))
                    continue
                stem = module_stem(item.name)
                if stem is not None:
                    out.append((stem, item.path))
    except OSError as exc:
        return out, exc.strerror or str(exc)
    return out, None


def archive_names(path: str) -> tuple[list[str], str | None]:
    """The top-level module names ``zipimport`` finds in the file at ``path`` (sorted), and
    why the file could not be read as an archive (None: it could)."""
    names: set[str] = set()
    try:
        with zipfile.ZipFile(path) as zf:
            members = zf.namelist()
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError) as exc:
        return [], f"not readable as a zip archive ({type(exc).__name__})"
    for member in members[:MAX_ZIP_MEMBERS]:
        first, sep, _ = member.partition("/")
        name = first if sep else module_stem(first)
        if name and name.isidentifier():
            names.add(name)
    error = f"more than {MAX_ZIP_MEMBERS} members" if len(members) > MAX_ZIP_MEMBERS else None
    return sorted(names), error


def editable_names(name: str) -> set[str]:
    """The module names an editable install of project ``name`` provides as its own."""
    flat = name.lower().replace("-", "_").replace(".", "_")
    return {flat} if flat else set()
