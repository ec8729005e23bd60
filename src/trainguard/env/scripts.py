"""Console-script launchers in plain ``env verify`` (TG623), with or without a RECORD row.

A RECORD row for a launcher vouches for nothing (whoever edits the launcher rewrites
the row), and a launcher whose row was deleted is still on ``PATH``.  So every file in
the environment's scripts folder named after an installed distribution's
``console_scripts``/``gui_scripts`` entry point is compared with what an installer
writes for it (:func:`trainguard.env.launcher.launcher_problem`).  Only distributions
with a RECORD give entry points: OS packages (no RECORD) write launchers of their own.
"""

from __future__ import annotations

import os
import stat

from trainguard.env.findings import finding
from trainguard.env.launcher import MAX_SCRIPT_BYTES, entry_points, launcher_problem
from trainguard.env.record import InstalledDist
from trainguard.filestate import Identity, entry_for
from trainguard.findings import Finding

MAX_ENTRY_POINTS_BYTES = 1024 * 1024


def read_small(path: str, limit: int) -> bytes | str:
    """Up to ``limit + 1`` bytes of a regular file, or why not (a FIFO is never read)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "not a regular file"
        return os.read(fd, limit + 1)
    except OSError as exc:
        return exc.strerror or str(exc)
    finally:
        os.close(fd)


def _prefix_scripts(root: str) -> str | None:
    """``<prefix>/bin`` for a site folder laid out as ``<prefix>/lib/pythonX.Y/site-packages``."""
    lib = os.path.dirname(os.path.dirname(root))
    if os.path.basename(os.path.dirname(root)).startswith("python") and os.path.basename(lib) in (
        "lib",
        "lib64",
    ):
        return os.path.join(os.path.dirname(lib), "bin")
    return None


def launcher_findings(
    dists: list[InstalledDist], roots: list[str]
) -> tuple[list[Finding], dict[str, Identity | None]]:
    """TG623 for each launcher that is not what an installer writes, and the stat (or
    absence) of every path looked at (inputs of a stored verdict)."""
    targets: dict[str, set[str]] = {}
    folders: set[str] = set()
    for dist in dists:
        if not dist.has_record:
            continue
        data = read_small(os.path.join(dist.meta_dir, "entry_points.txt"), MAX_ENTRY_POINTS_BYTES)
        if isinstance(data, str):
            continue  # none: most distributions declare no entry point
        scripts = entry_points(data[:MAX_ENTRY_POINTS_BYTES].decode("utf-8", "replace"))
        for name, target in scripts.items():
            targets.setdefault(name, set()).add(target)
        for row in dist.entries:
            if os.path.basename(row.path) in scripts and not row.path.startswith(
                dist.root + os.sep
            ):
                folders.add(os.path.dirname(row.path))
    for root in roots:
        guess = _prefix_scripts(root)
        if guess is not None and os.path.isdir(guess):
            folders.add(guess)
    out: list[Finding] = []
    seen: dict[str, Identity | None] = {}
    for folder in sorted(folders):
        for name in sorted(targets):
            path = os.path.join(folder, name)
            entry = entry_for(path)
            seen[path] = entry.identity if entry is not None else None
            if entry is None:
                continue  # a launcher RECORD lists and that is gone is TG602
            data = read_small(path, MAX_SCRIPT_BYTES)
            if isinstance(data, str):
                problems = [f"cannot be read as a launcher ({data})"]
            else:
                problems = [launcher_problem(path, data, t) or "" for t in sorted(targets[name])]
            if all(problems):
                out.append(
                    finding(
                        "TG623",
                        f"not the launcher an installer writes for the entry point {name} = "
                        f"{' or '.join(sorted(targets[name]))}: {problems[0]}",
                        path,
                        trigger=name,
                    )
                )
    return out, seen
