"""Which files some process on this machine still holds open for writing (Linux ``/proc``).

A checkpoint is scanned once its writer is done.  A stat that stopped changing
is the only signal a shared filesystem gives about writers on *other* hosts;
for writers on this host, ``/proc/PID/fdinfo`` says whether a descriptor was
opened for writing, which also covers a writer that pauses longer than the
settle time.  Where ``/proc`` is missing this returns nothing and the stat
rule alone decides.
"""

from __future__ import annotations

import os

# Reading every descriptor of every process is bounded: past this many, stop
# looking (the stat rule still applies) rather than stall the guard's loop.
MAX_DESCRIPTORS = 200_000
_PROC = "/proc"


def _writable(flags_line: str) -> bool:
    flags = int(flags_line.split(":", 1)[1].strip(), 8)
    return flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR)


def open_for_writing(candidates: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """The (device, inode) pairs among ``candidates`` that a process has open for writing."""
    if not candidates or not os.path.isdir(_PROC):
        return set()
    found: set[tuple[int, int]] = set()
    seen = 0
    try:
        pids = [p for p in os.listdir(_PROC) if p.isdigit()]
    except OSError:
        return set()
    for pid in pids:
        fd_dir = f"{_PROC}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            seen += 1
            if seen > MAX_DESCRIPTORS:
                return found
            try:
                st = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident not in candidates or ident in found:
                continue
            try:
                with open(f"{_PROC}/{pid}/fdinfo/{fd}") as info:
                    for line in info:
                        if line.startswith("flags:") and _writable(line):
                            found.add(ident)
                            break
            except (OSError, ValueError):
                continue
    return found
