"""Can a file's filesystem vouch for its stat, so that a cached digest may be used?

The digest cache trusts (device, inode, size, mtime, ctime): a change to the
content must change one of them.  That holds on local disk filesystems, where
the first write through a shared mapping to a page that was written back sets
mtime and ctime (and :data:`trainguard.filestate.RACY_NS` covers the
writeback delay).  It fails on:

- memory-backed filesystems (tmpfs, ramfs, hugetlbfs): pages are never written
  back, so after the first write fault a shared mapping can rewrite the file
  for ever with its stat unchanged;
- network and user-space filesystems (NFS, CIFS/SMB, FUSE, 9p, Ceph, Lustre...):
  the stat is whatever the server or the daemon says, and another machine can
  write the file without this kernel seeing it;
- anything we cannot identify.

So the rule is an allowlist of local filesystems whose timestamps the kernel
keeps itself; everything else is hashed afresh.  An overlay (containers) is
judged by the filesystem of its upper layer, where writes land.  The mount of
a file is found by its device number in ``/proc/self/mountinfo``; off Linux,
or when the device is not listed there (a btrfs subvolume's anonymous
device), the cache is not used.

Not covered: a process that has the file mapped for writing *now* on a disk
filesystem, between two write-backs.  Finding it means reading every
process's ``/proc/PID/maps`` (slow, and other users' are unreadable); the
minute-long racy window is the defence, and ``--full`` the gate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"
MAX_MOUNTINFO = 4 * 1024 * 1024  # thousands of mounts fit; a container host has ~100
VOUCHING = frozenset(
    {
        "ext2",
        "ext3",
        "ext4",
        "xfs",
        "btrfs",
        "f2fs",
        "jfs",
        "reiserfs",
        "bcachefs",
        "zfs",
        "nilfs2",
        # read-only images: nothing can write them behind the stat
        "squashfs",
        "erofs",
        "iso9660",
    }
)
_MEMORY = frozenset({"tmpfs", "ramfs", "hugetlbfs", "devtmpfs", "shm"})


@dataclass(frozen=True)
class Mount:
    fstype: str
    point: str
    super_options: str


def _unescape(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(code, char)
    return text


def read_mounts(path: str = MOUNTINFO) -> dict[tuple[int, int], Mount]:
    """(major, minor) -> the mount; empty when the table cannot be read."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_MOUNTINFO)
    except OSError:
        return {}
    mounts: dict[tuple[int, int], Mount] = {}
    for line in raw.decode("utf-8", "surrogateescape").splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:] or len(fields) < 7:
            continue
        dash = fields.index("-", 6)
        try:
            major, minor = (int(n) for n in fields[2].split(":"))
            fstype, options = fields[dash + 1], fields[dash + 3]
        except (ValueError, IndexError):
            continue
        # The last mount on a device wins, as the kernel resolves stacked mounts.
        mounts[(major, minor)] = Mount(fstype, _unescape(fields[4]), options)
    return mounts


class FilesystemTrust:
    """Answers "why may this device's stat not vouch for content?" (None: it may)."""

    def __init__(self, mounts: dict[tuple[int, int], Mount] | None = None) -> None:
        self._mounts = read_mounts() if mounts is None else mounts
        self._answers: dict[int, str | None] = {}

    def why_not(self, dev: int) -> str | None:
        if dev not in self._answers:
            self._answers[dev] = self._judge(dev)
        return self._answers[dev]

    def _judge(self, dev: int) -> str | None:
        mount = self._mounts.get((os.major(dev), os.minor(dev)))
        if mount is None:
            return "a filesystem that cannot be identified (not in /proc/self/mountinfo)"
        if mount.fstype == "overlay":
            return self._overlay(mount)
        return _verdict(mount)

    def _overlay(self, mount: Mount) -> str | None:
        upper = next(
            (
                o[len("upperdir=") :]
                for o in mount.super_options.split(",")
                if o.startswith("upperdir=")
            ),
            None,
        )
        if upper is None:
            return None  # read-only overlay: no layer can be written through it
        below = self._mount_of(_unescape(upper))
        if below is None:
            return f"an overlay at {mount.point} whose upper layer cannot be identified"
        why = _verdict(below)
        return None if why is None else f"an overlay at {mount.point} written to {why}"

    def _mount_of(self, path: str) -> Mount | None:
        best: Mount | None = None
        for m in self._mounts.values():
            inside = path == m.point or path.startswith(m.point.rstrip("/") + "/")
            if inside and (best is None or len(m.point) > len(best.point)):
                best = m
        return best


def _verdict(mount: Mount) -> str | None:
    kind = mount.fstype
    if kind in VOUCHING:
        return None
    if kind in _MEMORY:
        return (
            f"{kind} at {mount.point} (memory-backed: a write through a shared mapping "
            "leaves the timestamps unchanged)"
        )
    return (
        f"{kind} at {mount.point} (not a local disk filesystem whose timestamps the "
        "kernel keeps: a server, a daemon or another machine can change content behind them)"
    )
