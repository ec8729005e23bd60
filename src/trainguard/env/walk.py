"""What is on disk under the environment's folders, with one stat per entry.

Linked folders are not followed (an environment has none of its own; one
pointing at ``/`` would make the walk endless), and special files are listed
but never opened: opening a FIFO blocks, reading a device never ends.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from stat import S_ISLNK, S_ISREG
from typing import NamedTuple

# (device, inode, size, mtime, ctime), all in ns where it applies.  ctime
# changes on every write, rename or chmod and cannot be set back without
# changing the system clock, so an edit that restores the mtime still shows.
StatKey = tuple[int, int, int, int, int]


def stat_key(st: os.stat_result) -> StatKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# A file changed this shortly before it was looked at may change again without
# its key changing, so its key does not yet vouch for its content and nothing is
# remembered about it (git calls such files "racily clean").  Two reasons:
# - the kernel's clock for timestamps ticks every few ms (whole seconds on some
#   filesystems): a second write in the same tick leaves the key as it was;
# - a write through a shared memory mapping updates the timestamps only when it
#   faults on a clean page: once a page is dirty, further writes to it change
#   nothing in the stat until the page is written back (measured on this
#   project's ext4 machine: ~30 s, vm.dirty_expire_centisecs).
# A minute covers both with the kernel's default writeback; tmpfs never writes
# back, so there the window does not help (docs/env.md says so).
RACY_NS = 60 * 1_000_000_000


def settled(ctime_ns: int, now_ns: int) -> bool:
    """Whether a file last changed at ``ctime_ns`` may be remembered at ``now_ns``."""
    return ctime_ns < now_ns - RACY_NS


def key_text(key: StatKey) -> str:
    """``dev,ino,size,mtime,ctime``: how caches and fingerprints write a key."""
    return f"{key[0]},{key[1]},{key[2]},{key[3]},{key[4]}"


class Entry(NamedTuple):
    path: str
    size: int
    key: StatKey
    regular: bool  # a regular file, or a link to one
    link: bool


def entry_for(path: str) -> Entry | None:
    """The :class:`Entry` for one path, ``None`` when nothing is there."""
    # A re-verify calls this once per file (40,000 for torch): positional
    # arguments and an inline key keep it near the cost of the lstat itself.
    try:
        lst = os.lstat(path)
    except OSError:
        return None
    mode = lst.st_mode
    if not S_ISLNK(mode):
        key = (lst.st_dev, lst.st_ino, lst.st_size, lst.st_mtime_ns, lst.st_ctime_ns)
        return Entry(path, lst.st_size, key, S_ISREG(mode), False)
    try:
        st = os.stat(path)
    except OSError:
        return Entry(path, 0, stat_key(lst), False, True)
    return Entry(path, st.st_size, stat_key(st), S_ISREG(st.st_mode), True)


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
