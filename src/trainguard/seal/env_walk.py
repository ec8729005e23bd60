"""What is on disk under the environment's folders, with one stat per entry.

Linked folders are not followed (an environment has none of its own; one
pointing at ``/`` would make the walk endless), and special files are listed
but never opened: opening a FIFO blocks, reading a device never ends.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable
from typing import NamedTuple

# (device, inode, size, mtime, ctime), all in ns where it applies.  ctime
# changes on every write, rename or chmod and cannot be set back without
# changing the system clock, so an edit that restores the mtime still shows.
StatKey = tuple[int, int, int, int, int]


def stat_key(st: os.stat_result) -> StatKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Entry(NamedTuple):
    path: str
    size: int
    key: StatKey
    regular: bool  # a regular file, or a link to one
    link: bool


def entry_for(path: str) -> Entry | None:
    """The :class:`Entry` for one path, ``None`` when nothing is there."""
    try:
        lst = os.lstat(path)
    except OSError:
        return None
    link = stat.S_ISLNK(lst.st_mode)
    st = lst
    if link:
        try:
            st = os.stat(path)
        except OSError:
            return Entry(path, 0, stat_key(lst), regular=False, link=True)
    return Entry(path, st.st_size, stat_key(st), regular=stat.S_ISREG(st.st_mode), link=link)


FILE, LINK, SPECIAL = "file", "link", "special"


def walk(
    root: str, skip: Iterable[str] = (), errors: dict[str, str] | None = None
) -> dict[str, str]:
    """Every non-folder entry below ``root`` and its kind (:data:`FILE`, :data:`LINK`,
    :data:`SPECIAL`); folders in ``skip`` are not entered, and a folder that
    cannot be listed goes into ``errors`` (path -> reason).

    Kinds come from the folder listing itself, without a stat per file: the
    stats that matter are taken later, by whoever reads the file.
    """
    skipped = {os.path.normpath(s) for s in skip}
    found: dict[str, str] = {}
    pending = [root]
    while pending:
        folder = pending.pop()
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
