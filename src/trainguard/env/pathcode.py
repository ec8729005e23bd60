"""Findings about code on the ``sys.path`` entries that ``.pth`` files add (TG624, TG626).

Each entry is a root (see :mod:`.syspath`); a module there that no distribution owns
is code that runs when its name is imported.  It is **high** when that name is one the
interpreter or installed code means as something else or asks for: a standard-library
module, a module an installed distribution provides, or a name installed code imports
(the same lookup as TG604).  ``sitecustomize``/``usercustomize`` on such a root are
the start-up check's (TG608: the search path includes every folder root).  A file on
the path (a zip that ``zipimport`` reads, or anything else) is high by itself: its
members are not verified by anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from trainguard.env.findings import MAX_EVIDENCE_LINE, finding
from trainguard.env.imports import Importer, names_made_importable
from trainguard.env.pth import STARTUP_MODULES
from trainguard.env.syspath import STDLIB_NAMES, PathRoot, archive_names, folder_names, module_stem
from trainguard.filestate import Identity, entry_for
from trainguard.findings import Finding, Severity


@dataclass(frozen=True)
class Candidate:
    name: str  # a dotted module name importing runs ``file`` through
    file: str
    root: PathRoot


@dataclass
class RootCode:
    candidates: list[Candidate]
    findings: list[Finding]
    # Stats of what was listed outside the walked folders (the cached verdict's inputs).
    outside: dict[str, Identity | None]


def _identity(path: str) -> Identity | None:
    entry = entry_for(path)
    return entry.identity if entry is not None else None


def root_code(
    roots: list[PathRoot], unlisted: list[str], owned: set[str], owner: Callable[[str], object]
) -> RootCode:
    """The modules no RECORD lists on every root, and the findings about files on the path.

    ``unlisted`` are the walked files no RECORD lists (for roots inside a site folder);
    ``owned`` the folders holding a listed file; ``owner(path)`` the owning distribution."""
    found = RootCode([], [], {})
    for root in roots:
        if root.is_file:
            found.outside[root.path] = _identity(root.path)
            names, error = archive_names(root.path)
            shown = ", ".join(names[:20]) or "none"
            what = "a zip archive" if error is None else f"a file ({error})"
            found.findings.append(
                finding(
                    "TG624",
                    f"{root.pth} puts {what} on sys.path at every start; zipimport runs the "
                    f"modules it holds (top-level names: {shown[:MAX_EVIDENCE_LINE]}), and "
                    "nothing verifies them",
                    root.path,
                    trigger=root.line[:MAX_EVIDENCE_LINE],
                    pth=root.pth,
                    modules=shown[:MAX_EVIDENCE_LINE],
                )
            )
            continue
        if root.inside is not None:
            prefix = root.path + os.sep
            for path in unlisted:
                if path.startswith(prefix):
                    for name in names_made_importable(path, root.path, owned):
                        found.candidates.append(Candidate(name, path, root))
            continue
        found.outside[root.path] = _identity(root.path)
        listed, error = folder_names(root.path)
        for name, path in listed:
            found.outside[path] = _identity(path)
            if owner(path) is None:
                found.candidates.append(Candidate(name, path, root))
        if error is not None:
            found.findings.append(
                finding(
                    "TG624",
                    f"{root.pth} puts this folder on sys.path, and it could not be listed in "
                    f"full ({error}): what it makes importable is not known",
                    root.path,
                    trigger=root.line[:MAX_EVIDENCE_LINE],
                    pth=root.pth,
                )
            )
    return found


def installed_top_names(paths: Iterable[str], roots: list[str]) -> set[str]:
    """The top-level module names the listed files provide in the site folders."""
    out: set[str] = set()
    for path in paths:
        for root in roots:
            if path.startswith(root + os.sep):
                first, sep, _ = path[len(root) + 1 :].partition(os.sep)
                name = first if sep else module_stem(first)
                if name and name.isidentifier():
                    out.add(name)
                break
    return out


def wanted_names(candidates: list[Candidate]) -> set[str]:
    """The names to look up among installed code's imports."""
    return {c.name for c in candidates if c.name.partition(".")[0] not in STARTUP_MODULES}


def candidate_findings(
    candidates: list[Candidate],
    installed: set[str],
    importers: dict[str, Importer],
    own_names: dict[str, set[str]],
) -> list[Finding]:
    """One finding per file whose name makes it run (the first reason found)."""
    out: list[Finding] = []
    done: set[str] = set()
    for cand in candidates:
        top = cand.name.partition(".")[0]
        if cand.file in done or top in STARTUP_MODULES:
            continue  # customize modules: TG608, from the start-up search
        reason = ""
        evidence: dict[str, str] = {}
        by = importers.get(cand.name)
        if top in STDLIB_NAMES:
            reason = f"the standard library's module name {top!r}"
        elif top in installed and top not in own_names.get(cand.root.path, set()):
            reason = f"the name of an installed module ({top!r})"
        elif by is not None:
            where = f"{by.file}:{by.line}" if by.line else by.file
            reason = f"a name installed code imports when present ({where}: {by.how})"
            evidence = {"imported_by": where}
        if not reason:
            continue
        done.add(cand.file)
        if by is not None and top in own_names.get(cand.root.path, set()):
            # An editable install's own project, imported by other installed code: honest
            # in a developer's environment (pip install -e of a library others use), and
            # what a forged editable install named after an optional dependency looks like.
            out.append(
                finding(
                    "TG626",
                    f"an editable install's own module, which installed code imports "
                    f"({evidence['imported_by']}), from a source folder nothing verifies",
                    cand.file,
                    severity=Severity.MEDIUM,
                    trigger=cand.root.line[:MAX_EVIDENCE_LINE],
                    evidence=evidence,
                    module=cand.name,
                    path_entry=cand.root.path,
                )
            )
            continue
        out.append(
            finding(
                "TG624",
                f"no RECORD lists it, and it is what `import {cand.name}` runs from the "
                f"sys.path entry {cand.root.path} that {os.path.basename(cand.root.pth)} "
                f"adds: {reason}"[: 4 * MAX_EVIDENCE_LINE],
                cand.file,
                severity=Severity.HIGH,
                trigger=cand.root.line[:MAX_EVIDENCE_LINE],
                evidence=evidence,
                module=cand.name,
                path_entry=cand.root.path,
                pth=cand.root.pth,
            )
        )
    return out
