"""Rotating the anchor file without losing a run's pin.

The anchor file gets one line per run and is read whole, under caps
(:data:`~trainguard.ledger.anchorfile.MAX_ANCHOR_BYTES`, ``MAX_ANCHOR_LINES``): a
file past them pins nothing (TG1216 high).  Moving it aside by hand kept its runs
verifiable only with ``--anchors OLD``, so an old run quietly lost its default pin.

Rotation keeps every entry where a verify looks for it, and each verify reads a
bounded amount: once the file reaches :data:`ROTATE_BYTES`, the writer that
crossed it moves the file's lines into an archive folder beside it
(``anchors.jsonl.d/``), one bucket file per 2 hex digits of the SHA-256 of the
run id (256 buckets).  A verify reads the current file and the one bucket its
run id names: each rotation adds about ``ROTATE_BYTES / 256`` (32 KiB) to a
bucket, so a bucket reaches the read cap after some 2,000 rotations (about 60
million runs).  Why not more buckets: each bucket written is fsynced before the
rotated file is deleted, and 4,096 fsyncs took 28-32 s on the loaded 2-core
build machine against 3.9 s for 256 (the writer that rotates is a watch start).
Lines that are no entry (no run id to file them under) go to ``malformed.jsonl``
there, kept and never read.

Concurrent writers: rotation runs under an exclusive ``flock`` on
``anchors.jsonl.lock``; the file is renamed into the archive folder first, then
locked exclusively, which waits for every append in flight (appends hold a
shared lock on the file they write and check, once they hold it, that the path
still names that file, else they write to the new one).  A crash between the
rename and the end leaves ``rotating-*.jsonl`` in the folder: verify reads those
too (at most :data:`MAX_LEFTOVERS`), and the next rotation files them first.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import time
from pathlib import Path

ROTATE_BYTES = 8 << 20  # ~28,000 runs a file; far below the read caps
BUCKET_HEX = 2  # 256 buckets (see the module text: fsyncs per rotation)
MAX_LEFTOVERS = 4  # interrupted rotations a verify reads before it refuses (TG1216)
LEFTOVER_PREFIX = "rotating-"
MALFORMED = "malformed.jsonl"
MAX_MOVED_BYTES = 64 << 20  # a file to file into buckets (the read cap: nothing larger is ours)
MAX_REOPENS = 100  # an append that keeps finding its file renamed away gives up


class RotationError(OSError):
    """The anchor line was written; moving the full file into the archive failed."""


def archive_dir(path: Path) -> Path:
    return path.with_name(path.name + ".d")


def bucket_path(path: Path, run_id: str) -> Path:
    """The archive file that holds ``run_id``'s rotated entries."""
    digest = hashlib.sha256(run_id.encode("utf-8", "surrogatepass")).hexdigest()
    return archive_dir(path) / f"{digest[:BUCKET_HEX]}.jsonl"


def leftovers(path: Path) -> list[Path]:
    """Files an interrupted rotation left in the archive folder, oldest name first."""
    folder = archive_dir(path)
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith(LEFTOVER_PREFIX))
    except FileNotFoundError:
        return []
    return [folder / n for n in names]


def foreign(info: os.stat_result) -> bool:
    """Owned by someone else, or writable by group or others: anyone could rewrite it."""
    owner = getattr(os, "getuid", None)
    if owner is not None and info.st_uid != owner():
        return True
    return bool(info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def append_line(path: Path, line: bytes) -> int:
    """Append ``line`` to the anchor file whole, under a shared lock on the very file the
    path names when the lock is held (a rotation may rename it meanwhile); returns the
    file's size after the write."""
    for _ in range(MAX_REOPENS):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            info = os.fstat(fd)
            if foreign(info):
                raise ValueError(f"{path} is not the user's own file (owner or mode): not written")
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                continue  # renamed away by a rotation: write to the new file
            if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
                continue
            # One write of one line: concurrent runs' lines never interleave on a local disk.
            if os.write(fd, line) != len(line):
                raise OSError(f"{path}: short write of the anchor line")
            return os.fstat(fd).st_size
        finally:
            os.close(fd)  # releases the lock
    raise OSError(f"{path}: renamed away {MAX_REOPENS} times while appending; not written")


def rotate(path: Path) -> bool:
    """Move the anchor file's lines into their buckets, if it is still at or past
    :data:`ROTATE_BYTES` once the rotation lock is held; True when this call rotated."""
    folder = archive_dir(path)
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        if foreign(os.stat(folder)):
            raise RotationError(f"{folder} is not the user's own folder (owner or mode)")
        lock = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError as exc:
        raise RotationError(f"{path}: cannot rotate: {exc}") from exc
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for left in leftovers(path):  # an interrupted rotation's lines first
            _file_lines(path, left)
        try:
            if os.stat(path).st_size < ROTATE_BYTES:
                return False  # another writer rotated it meanwhile
        except FileNotFoundError:
            return False
        moving = folder / f"{LEFTOVER_PREFIX}{time.time_ns():020d}-{os.getpid()}.jsonl"
        os.rename(path, moving)
        _file_lines(path, moving)
        return True
    except OSError as exc:
        raise RotationError(f"{path}: rotation failed: {exc}") from exc
    finally:
        os.close(lock)


def _file_lines(path: Path, moving: Path) -> None:
    """Append each line of ``moving`` to its bucket, then delete it.  Its exclusive lock
    waits out the appends that opened it before it was renamed."""
    fd = os.open(moving, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_size > MAX_MOVED_BYTES:
            raise RotationError(f"{moving} is over {MAX_MOVED_BYTES} bytes: left for the user")
        by_bucket: dict[Path, list[bytes]] = {}
        with os.fdopen(os.dup(fd), "rb") as handle:
            for raw in handle:
                line = raw if raw.endswith(b"\n") else raw + b"\n"
                target = _bucket_of(path, line)
                by_bucket.setdefault(target, []).append(line)
        for target, lines in by_bucket.items():
            out = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                if foreign(os.fstat(out)):
                    raise RotationError(f"{target} is not the user's own file (owner or mode)")
                data = b"".join(lines)
                if os.write(out, data) != len(data):
                    raise OSError(f"{target}: short write")
                os.fsync(out)
            finally:
                os.close(out)
        os.unlink(moving)  # every line is in its bucket: a crash before this repeats them
    finally:
        os.close(fd)


def _bucket_of(path: Path, line: bytes) -> Path:
    try:
        data = json.loads(line)
    except (ValueError, RecursionError):
        data = None
    run_id = data.get("run_id") if isinstance(data, dict) else None
    if not isinstance(run_id, str):
        return archive_dir(path) / MALFORMED
    return bucket_path(path, run_id)
