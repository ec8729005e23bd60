"""Hash files and file ranges in parallel, with bounded memory.

Work is split into pieces (a whole file, or one shard of it) hashed by a pool
of threads.  hashlib and blake3 release the GIL while they hash, so the
threads really run side by side; BLAKE3 also spreads one large piece over
several cores.  Large pieces are hashed through a memory map of one window
(16 MiB) at a time, unmapped right after: no copy into a buffer (which costs
as much as BLAKE3 itself), and at most ``workers x window`` resident whatever
the file sizes.

A piece is hashed through a file descriptor opened without following links,
and the file's identity and timestamps are checked before and after: a file
swapped or written while it is hashed is an error, never a digest of
something else.  A file truncated while a window of it is mapped would kill
the process (SIGBUS, never a "verified"); the size is checked before each
window, which leaves that race a few milliseconds wide.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from trainguard.filestate import Identity, default_workers
from trainguard.signing.errors import SealError

HASHES = ("sha256", "blake3", "blake2b")
# What ``trainguard seal --hash`` offers; blake2b is verified for model-signing's sake.
SEAL_HASHES = ("sha256", "blake3")
# The window each worker maps (or reads) at a time: large enough that a system
# call per window costs nothing, small enough that workers x window stays far
# below the 200 MB memory budget.
MAX_CHUNK = 16 * 1024 * 1024
MIN_CHUNK = 1024 * 1024
BUFFER_BUDGET = 128 * 1024 * 1024
# Smaller pieces are read: mapping costs more than copying a few pages.
MAP_FROM = 1024 * 1024
# BLAKE3 spreads a single piece over all cores only when it is this large;
# smaller pieces are hashed one per worker.
BLAKE3_THREADED_FROM = 64 * 1024 * 1024


class _Hasher(Protocol):
    def update(self, data: memoryview, /) -> object: ...

    def digest(self) -> bytes: ...


def new_hasher(algorithm: str, size_hint: int = 0) -> _Hasher:
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake2b":
        return hashlib.blake2b()  # model-signing's "blake2b": 64-byte digests
    if algorithm == "blake3":
        from blake3 import blake3

        threads = blake3.AUTO if size_hint >= BLAKE3_THREADED_FROM else 1
        return blake3(max_threads=threads)
    raise SealError(f"unsupported hash algorithm {algorithm!r} (supported: {', '.join(HASHES)})")


def digest_bytes(algorithm: str, data: bytes) -> bytes:
    hasher = new_hasher(algorithm)
    hasher.update(memoryview(data))
    return hasher.digest()


@dataclass(frozen=True)
class Piece:
    """Bytes ``[start, end)`` of the file at ``path`` (absolute)."""

    path: str
    start: int
    end: int
    identity: Identity


@dataclass
class HashStats:
    """What a run hashed (tests use it to prove the digest cache was used)."""

    bytes_hashed: int = 0
    pieces_hashed: int = 0
    files_from_cache: int = 0
    # Why cached digests were not used for some files -> how many files.
    cache_refused: dict[str, int] = field(default_factory=dict)


Progress = Callable[[int], None]


def _open_checked(piece: Piece) -> int:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(piece.path, flags)
    except OSError as exc:
        raise SealError(f"{piece.path}: cannot open: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or Identity.of(st) != piece.identity:
        os.close(fd)
        raise SealError(f"{piece.path}: the file changed or was replaced while being hashed")
    return fd


class Cancelled(SealError):
    """Hashing stopped because another piece failed or the run was interrupted."""


def _update_mapped(hasher: _Hasher, fd: int, start: int, end: int) -> None:
    """Hash bytes [start, end) of ``fd`` through a short-lived memory map.

    No copy into a buffer (for BLAKE3 the copy would cost as much as the hash),
    and the window is unmapped at once, so it is resident only meanwhile.
    """
    base = start - start % mmap.ALLOCATIONGRANULARITY
    with mmap.mmap(fd, end - base, access=mmap.ACCESS_READ, offset=base) as mapped:
        if hasattr(mapped, "madvise"):
            mapped.madvise(mmap.MADV_SEQUENTIAL)
        with memoryview(mapped) as whole, whole[start - base :] as view:
            hasher.update(view)


def hash_piece(
    piece: Piece,
    algorithm: str,
    window: int = MAX_CHUNK,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> bytes:
    """The digest of one piece, read ``window`` bytes at a time."""
    fd = _open_checked(piece)
    try:
        hasher = new_hasher(algorithm, piece.end - piece.start)
        use_map = piece.end - piece.start >= MAP_FROM
        offset = piece.start
        while offset < piece.end:
            if stop is not None and stop.is_set():
                raise Cancelled(f"{piece.path}: hashing cancelled")
            end = min(offset + window, piece.end)
            # Touching a mapped page past the end of a file that shrank kills the
            # process (SIGBUS): check the size right before each window.
            if os.fstat(fd).st_size < end:
                raise SealError(f"{piece.path}: the file shrank while being hashed")
            if use_map:
                try:
                    _update_mapped(hasher, fd, offset, end)
                except OSError:  # a filesystem that cannot map: read instead
                    use_map = False
            if not use_map:
                data = os.pread(fd, end - offset, offset)
                if len(data) != end - offset:
                    raise SealError(f"{piece.path}: the file shrank while being hashed")
                hasher.update(memoryview(data))
            if progress is not None:
                progress(end - offset)
            offset = end
        if Identity.of(os.fstat(fd)) != piece.identity:
            raise SealError(f"{piece.path}: the file changed while being hashed")
        return hasher.digest()
    finally:
        os.close(fd)


def hash_pieces(
    pieces: Sequence[Piece],
    algorithm: str,
    *,
    workers: int | None = None,
    progress: Progress | None = None,
    stats: HashStats | None = None,
) -> list[bytes]:
    """The digest of every piece, in the order given."""
    # Not imported with the module: concurrent.futures pulls in logging.
    from concurrent.futures import ThreadPoolExecutor, as_completed

    new_hasher(algorithm)  # fail on an unknown algorithm before starting threads
    if not pieces:
        return []
    count = min(workers or default_workers(), len(pieces))
    window = max(MIN_CHUNK, min(MAX_CHUNK, BUFFER_BUDGET // count))
    lock = threading.Lock()
    stop = threading.Event()
    totals = HashStats()

    def run(piece: Piece) -> bytes:
        digest = hash_piece(piece, algorithm, window, progress, stop)
        with lock:
            totals.bytes_hashed += piece.end - piece.start
            totals.pieces_hashed += 1
        return digest

    # Largest first, so that a big file does not start last and run alone.
    order = sorted(range(len(pieces)), key=lambda i: pieces[i].end - pieces[i].start, reverse=True)
    results: list[bytes] = [b""] * len(pieces)
    pool = ThreadPoolExecutor(max_workers=count, thread_name_prefix="trainguard-hash")
    try:
        futures = {pool.submit(run, pieces[i]): i for i in order}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
    finally:
        # On the first error (or Ctrl-C) stop the running pieces at their next
        # read and drop those not started.
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
    if stats is not None:
        stats.bytes_hashed += totals.bytes_hashed
        stats.pieces_hashed += totals.pieces_hashed
    return results
