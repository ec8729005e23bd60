"""What a verify looks at, and which check judges each file found there.

A file is judged by exactly one thing: a RECORD row that lists it, the
``.pth`` or customize check, the pyc check (every ``__pycache__`` entry of
this interpreter), the claim of a distribution without RECORD, or nothing,
which makes it an unlisted file.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from importlib.machinery import BYTECODE_SUFFIXES, SOURCE_SUFFIXES

from trainguard.env.checks import Ownership
from trainguard.env.pyc import optimization_of
from trainguard.env.snapshot import Snapshot
from trainguard.env.syspath import PathRoot
from trainguard.env.walk import SPECIAL, walk
from trainguard.env.wheels import Reference

PYCACHE = "__pycache__"


def source_of(pyc: str) -> str:
    folder, name = os.path.split(pyc)
    return os.path.join(os.path.dirname(folder), name.partition(".")[0] + SOURCE_SUFFIXES[0])


@dataclass
class Sorted:
    pycs: list[tuple[str, str, int]] = field(default_factory=list)  # pyc, source, level
    foreign_pycs: set[str] = field(default_factory=set)  # other interpreters' caches
    legacy_pycs: list[str] = field(default_factory=list)
    unlisted: list[str] = field(default_factory=list)
    claimed: Counter[str] = field(default_factory=Counter)


def sort_files(present: dict[str, str], own: Ownership, judged: set[str]) -> Sorted:
    out = Sorted()
    sep = os.sep
    pycache = sep + PYCACHE
    bytecode = tuple(BYTECODE_SUFFIXES)
    for path, kind in present.items():
        folder, _, name = path.rpartition(sep)
        # A FIFO or device named like a pyc is never opened: it is reported
        # as an unlisted entry instead.
        is_pyc = name.endswith(bytecode) and kind != SPECIAL
        if is_pyc and folder.endswith(pycache):
            level = optimization_of(name)
            if level is None:
                out.foreign_pycs.add(path)
            else:
                out.pycs.append((path, source_of(path), level))
            continue
        if path in judged:
            continue
        owned = own.rows.get(path)
        if owned:
            if is_pyc and all(e.digest is None for _, e in owned):
                out.legacy_pycs.append(path)
            continue
        claimed = own.claimed_by(path)
        if claimed is not None:
            out.claimed[claimed.meta_dir] += 1
        elif is_pyc:
            out.legacy_pycs.append(path)
        else:
            out.unlisted.append(path)
    return out


def legacy_source(pyc: str) -> str:
    """The source beside a pyc kept in the pre-PEP 3147 place (``mod.pyc``)."""
    return pyc[: -len(".pyc")] + SOURCE_SUFFIXES[0]


def in_pycache(path: str) -> bool:
    """A cached pyc of this interpreter (the pyc check judges it, not its digest)."""
    folder, _, name = path.rpartition(os.sep)
    return folder.endswith(os.sep + PYCACHE) and optimization_of(name) is not None


@dataclass(frozen=True)
class Scope:
    """What one verify looks at, and how."""

    roots: list[str]  # site folders, in sys.path order
    search: list[str]  # where customize modules are looked for
    stdlib: list[str] = field(default_factory=list)  # pyc check (and snapshot) only
    check_pyc: bool = True
    workers: int | None = None
    collect_digests: bool = False
    against: Snapshot | None = None
    against_label: str = ""
    reference: Reference | None = None  # wheels (and a lock) to compare installed files with
    # The sys.path entries the site folders' .pth files add (see env.syspath).
    path_roots: tuple[PathRoot, ...] = ()


def walk_scope(
    scope: Scope, errors: dict[str, str], folders: list[str] | None = None
) -> tuple[dict[str, str], dict[str, str]]:
    """Entries under the site folders, and under the standard library folders
    (``folders`` receives every folder entered)."""
    present: dict[str, str] = {}
    for root in scope.roots:
        nested = [r for r in scope.roots if r != root and r.startswith(root + os.sep)]
        present.update(walk(root, nested, errors, folders))
    stdlib: dict[str, str] = {}
    for folder in scope.stdlib:
        # A base interpreter's own site-packages is not this environment's.
        skip = [
            *scope.roots,
            *(os.path.join(folder, n) for n in ("site-packages", "dist-packages")),
        ]
        for path, kind in walk(folder, skip, errors, folders).items():
            if path not in present:
                stdlib[path] = kind
    return present, stdlib
