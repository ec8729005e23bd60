"""Files the dynamic loader runs, and RECORD rows that vouch for another package's files.

A shared library needs no import to run: ``ld.so`` finds a dependency by searching
folders (a library's ``RUNPATH $ORIGIN`` is its own folder), so a library planted
under a name that an installed library needs (``torch/lib/libgcc_s.so.1``) runs its
constructor at ``import torch`` whatever Python's import system sees.  So a file no
RECORD lists inside an installed package's folder is high when the loader can run it:
its first bytes are an executable format's magic (ELF, Mach-O, PE), or its name is a
library's (``.so``, ``.so.N``, ``.dylib``, ``.pyd``, ``.dll``), whatever else it is.

And a RECORD row vouches only for its own distribution's files: a row in one
distribution's RECORD for a file in a folder whose files another distribution's
RECORD lists (and this one lists nothing else there) is a planted voucher.  The rule,
per folder below a site folder: the distributions that list files there that no other
distribution lists; the one listing the most owns the folder, and every other one's
rows there are foreign (TG628).  A file listed by several RECORDs (a namespace
package's ``__init__.py``) is nobody's alone and decides nothing; ``__pycache__``
belongs to its parent folder; scripts and data outside the site folders are judged by
the launcher check, not here.  A new sub-folder that only the planting RECORD lists is
not caught by this rule: nothing searches it unless something names it (the import
check and the loader rule above cover what would).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable

from trainguard.env.findings import finding
from trainguard.env.record import InstalledDist
from trainguard.env.walk import LINK
from trainguard.findings import Finding

# ELF; Mach-O 32/64 either byte order, and fat binaries; PE/COFF ("MZ").
_MAGIC = (
    b"\x7fELF",
    b"\xfe\xed\xfa\xce",
    b"\xfe\xed\xfa\xcf",
    b"\xce\xfa\xed\xfe",
    b"\xcf\xfa\xed\xfe",
    b"\xca\xfe\xba\xbe",
    b"MZ",
)
_LIBRARY_SUFFIXES = (".so", ".dylib", ".pyd", ".dll")
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def loader_format(path: str) -> str | None:
    """What makes ``path`` something the dynamic loader runs: its magic or its name."""
    name = os.path.basename(path)
    try:
        fd = os.open(path, _OPEN_FLAGS | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        head = b""
    else:
        try:
            head = os.read(fd, 4)
        except OSError:
            head = b""
        finally:
            os.close(fd)
    if head.startswith(_MAGIC):
        return "executable-format magic " + head[:4].hex()
    if name.endswith(_LIBRARY_SUFFIXES) or ".so." in name:
        return "a shared library's name"
    return None


def native_finding(path: str, host: str, root: str, size: int, how: str) -> Finding:
    return finding(
        "TG627",
        f"no RECORD lists it, and the dynamic loader can run it ({how}) from inside the "
        f"installed package folder {os.path.relpath(host, root)}: a library there is found by "
        "search path ($ORIGIN) without any import naming it",
        path,
        host=host,
        size=str(size),
        loader=how,
    )


def link_finding(path: str, root: str, kind: str) -> Finding | None:
    """TG604 for a link at an import root whose name Python imports: ``opt_einsum`` as a
    link to a folder elsewhere is the package ``import opt_einsum`` runs."""
    if kind != LINK or os.path.dirname(path) != root:
        return None
    name = os.path.basename(path)
    stem = name.partition(".")[0]
    is_folder = os.path.isdir(path)
    if not stem.isidentifier() or (
        not is_folder and not name.endswith((".py", *_LIBRARY_SUFFIXES))
    ):
        return None
    target = os.path.realpath(path)
    what = "package" if is_folder else "module"
    return finding(
        "TG604",
        f"a link no RECORD lists, at an import root: it is the {what} `import {stem}` runs, "
        f"whose code lives at {target[:200]}, which nothing verifies",
        path,
        module=stem,
        target=target[:200],
    )


def _home(path: str) -> str:
    folder = os.path.dirname(path)
    if os.path.basename(folder) == "__pycache__":
        folder = os.path.dirname(folder)
    return folder


def foreign_rows(dists: Iterable[InstalledDist], roots: Iterable[str]) -> list[Finding]:
    """TG628 for each RECORD row in a folder another distribution owns (see module doc)."""
    listers: dict[str, list[InstalledDist]] = {}
    for dist in dists:
        for row in dist.entries:
            listers.setdefault(row.path, []).append(dist)
    stop = set(roots)
    alone: dict[str, Counter[str]] = {}  # folder -> meta_dir -> files listed only by it
    by_meta: dict[str, InstalledDist] = {}
    for path, who in listers.items():
        if len(who) != 1:
            continue
        folder = _home(path)
        if folder in stop or not any(folder.startswith(r + os.sep) for r in stop):
            continue
        by_meta[who[0].meta_dir] = who[0]
        alone.setdefault(folder, Counter())[who[0].meta_dir] += 1
    out: list[Finding] = []
    for folder, counts in alone.items():
        if len(counts) < 2:
            continue
        (owner_meta, most), *rest = counts.most_common()
        owner = by_meta[owner_meta]
        for meta, n in rest:
            dist = by_meta[meta]
            # A tie leaves no owner: every side is reported.
            tied = n == most
            for path, who in listers.items():
                if len(who) == 1 and who[0] is dist and _home(path) == folder:
                    out.append(
                        finding(
                            "TG628",
                            f"{dist.label}'s RECORD lists this file in {folder}, whose other "
                            f"files {owner.label}'s RECORD lists ({most} against {n}"
                            f"{', a tie' if tied else ''}): a RECORD vouches only for its "
                            "own distribution's folders",
                            path,
                            listed_by=dist.label,
                            folder_owner=owner.label,
                        )
                    )
    return out
