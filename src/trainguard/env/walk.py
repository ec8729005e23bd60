"""What is on disk under the environment's folders, with one stat per entry.

Linked folders are not followed (an environment has none of its own; one
pointing at ``/`` would make the walk endless), and special files are listed
but never opened: opening a FIFO blocks, reading a device never ends.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from trainguard.filestate import Entry, entry_for


def entry_in(stats: dict[str, Entry | None], path: str) -> Entry | None:
    """``path``'s entry from ``stats`` (the stats one verify took), taking it if not yet."""
    if path not in stats:
        stats[path] = entry_for(path)
    return stats[path]


FILE, LINK, SPECIAL = "file", "link", "special"


def walk(
    root: str,
    skip: Iterable[str] = (),
    errors: dict[str, str] | None = None,
    folders: list[str] | None = None,
) -> dict[str, str]:
    """Every non-folder entry below ``root`` and its kind (:data:`FILE`, :data:`LINK`,
    :data:`SPECIAL`); folders in ``skip`` are not entered, a folder that cannot
    be listed goes into ``errors`` (path -> reason), and every folder entered
    (``root`` included) into ``folders``.

    Kinds come from the folder listing itself, without a stat per file: the
    stats that matter are taken later, by whoever reads the file.
    """
    skipped = {os.path.normpath(s) for s in skip}
    found: dict[str, str] = {}
    pending = [root]
    while pending:
        folder = pending.pop()
        if folders is not None:
            folders.append(folder)
        try:
            with os.scandir(folder) as it:
                for item in it:
                    if item.is_dir(follow_symlinks=False):
                        if item.path not in skipped:
                            pending.append(item.path)
                    elif item.is_file(follow_symlinks=False):
                        found[item.path] = FILE
                    elif item.is_symlink():
                        found[item.path] = LINK
                    else:
                        found[item.path] = SPECIAL
        except OSError as exc:
            if errors is not None:
                errors[folder] = exc.strerror or str(exc)
    return found


def sys_path_folders(path: Iterable[str]) -> list[str]:
    """Existing folders of ``path`` (``sys.path`` by default), in order, once each."""
    seen: set[str] = set()
    out: list[str] = []
    for item in path:
        folder = os.path.abspath(item or os.curdir)
        if folder in seen or not os.path.isdir(folder):
            continue
        seen.add(folder)
        out.append(folder)
    return out


def startup_search_path() -> list[str]:
    """The folders the interpreter searches when site imports sitecustomize.

    ``sys.path[0]`` (the script's folder, or the current one) is added after
    site has run, so it is left out, unless ``-P`` kept it from being added.
    """
    safe_path = bool(getattr(sys.flags, "safe_path", False))
    return sys_path_folders(sys.path if safe_path else sys.path[1:])
