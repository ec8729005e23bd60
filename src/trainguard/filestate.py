"""What a file on disk is, as every cache and fingerprint of trainguard sees it.

One identity (device, inode, size, mtime, ctime), one :class:`Entry`, one rule
for files changed too recently to be remembered, and one worker count: the
environment check, model signing and their shared digest cache all use these,
so that "the same file in the same state" means the same thing everywhere.
"""

from __future__ import annotations

import os
from stat import S_ISLNK, S_ISREG
from typing import NamedTuple


class Identity(NamedTuple):
    """(device, inode, size, mtime, ctime), times in ns.

    ctime changes on every write, rename or chmod and cannot be set back
    without changing the system clock, so an edit that restores the mtime
    still shows.  A tuple, so that a re-verify can build 40,000 of them cheaply.
    """

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def text(self) -> str:
        """``dev,ino,size,mtime,ctime``: how caches and fingerprints write it."""
        return f"{self[0]},{self[1]},{self[2]},{self[3]},{self[4]}"


# A file changed this shortly before it was looked at may change again without
# its identity changing, so its identity does not yet vouch for its content and
# nothing is remembered about it (git calls such files "racily clean").  Two reasons:
# - the kernel's clock for timestamps ticks every few ms (whole seconds on some
#   filesystems): a second write in the same tick leaves the identity as it was;
# - a write through a shared memory mapping updates the timestamps only when it
#   faults on a clean page: once a page is dirty, further writes to it change
#   nothing in the stat until the page is written back (measured on this
#   project's ext4 machine: ~30 s, vm.dirty_expire_centisecs).
# A minute covers both with the kernel's default writeback; tmpfs never writes
# back, so there the window does not help (docs/env.md says so).
RACY_NS = 60 * 1_000_000_000


def settled(ctime_ns: int, now_ns: int) -> bool:
    """Whether a file last changed at ``ctime_ns`` (the ctime: every change sets it,
    and nobody can set it back) and looked at from ``now_ns`` on may be remembered."""
    return ctime_ns < now_ns - RACY_NS


class Entry(NamedTuple):
    """One path and the state of what it names (of a link's target, for a link)."""

    path: str
    identity: Identity
    regular: bool  # a regular file, or a link to one
    link: bool

    @property
    def size(self) -> int:
        return self.identity[2] if self.regular else 0


def entry_for(path: str) -> Entry | None:
    """The :class:`Entry` for one path, ``None`` when nothing is there."""
    # A re-verify calls this once per file (40,000 for torch): one lstat, and a
    # stat only for links.
    try:
        lst = os.lstat(path)
    except OSError:
        return None
    if not S_ISLNK(lst.st_mode):
        return Entry(path, Identity.of(lst), S_ISREG(lst.st_mode), False)
    try:
        st = os.stat(path)
    except OSError:
        return Entry(path, Identity.of(lst), False, True)  # a dangling link
    return Entry(path, Identity.of(st), S_ISREG(st.st_mode), True)


MAX_WORKERS = 32


def default_workers() -> int:
    """One thread per core this process may run on (its CPU affinity, not the
    machine's core count: a job pinned to 4 of 64 cores gets 4).

    With the page cache warm, hashing is CPU-bound and extra threads only
    contend for the GIL between reads (measured slower on 2 cores); callers
    take ``--workers`` to raise it for slow network filesystems.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))
