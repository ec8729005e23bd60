"""Streamed, parallel file hashing with large reads.

hashlib and ``os.readv`` release the GIL on large buffers, so threads hash
several files at once; each thread reuses one buffer.  Large files are single
tasks, small ones go in batches so that the pool's overhead stays below the
cost of opening them.  A file is opened without following it into a FIFO or a
device: anything but a regular file is an error, never a read.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import NamedTuple, Protocol

from trainguard.digest_cache import DigestCache
from trainguard.env.walk import FILE, SPECIAL, entry_in
from trainguard.filestate import Entry, Identity, default_workers

CHUNK = 1024 * 1024
# Files at least this large are hashed as tasks of their own.
LARGE_FILE = 4 * CHUNK
# Small files per task: enough to amortise a task, few enough to balance.
BATCH_FILES = 128
DEFAULT_ALGORITHM = "sha256"
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_BINARY", 0)
)


class Digests(NamedTuple):
    size: int
    key: Identity
    values: dict[str, bytes]


# A job: the path and the algorithms wanted for it.
Job = tuple[str, frozenset[str]]
Advance = Callable[[int], None]  # called with the bytes just hashed


class NotRegularFileError(OSError):
    pass


def hash_file(path: str, algorithms: frozenset[str], buf: bytearray | None = None) -> Digests:
    """Digests of ``path`` in every algorithm of ``algorithms``, read once."""
    buffer = buf if buf is not None else bytearray(CHUNK)
    view = memoryview(buffer)
    hashers = [hashlib.new(name) for name in sorted(algorithms)]
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(f"{path}: not a regular file")
        total = 0
        while True:
            n = os.readv(fd, [view])
            if not n:
                break
            total += n
            if total > st.st_size + len(buffer):
                # Still growing: whatever the digest, it describes no stable file.
                raise OSError(f"{path}: the file grew while it was read")
            chunk = view[:n]
            for h in hashers:
                h.update(chunk)
    finally:
        os.close(fd)
    return Digests(total, Identity.of(st), {h.name: h.digest() for h in hashers})


def _hash_batch(batch: Sequence[Job]) -> list[tuple[str, Digests | str]]:
    buf = bytearray(CHUNK)
    out: list[tuple[str, Digests | str]] = []
    for path, algorithms in batch:
        try:
            out.append((path, hash_file(path, algorithms, buf)))
        except OSError as exc:
            out.append((path, exc.strerror or str(exc)))
    return out


def _batches(jobs: Sequence[Job], sizes: dict[str, int]) -> list[list[Job]]:
    # Largest first, so that the last tasks to finish are the short ones.
    ordered = sorted(jobs, key=lambda job: sizes.get(job[0], 0), reverse=True)
    batches: list[list[Job]] = []
    small: list[Job] = []
    for job in ordered:
        if sizes.get(job[0], 0) >= LARGE_FILE:
            batches.append([job])
            continue
        small.append(job)
        if len(small) == BATCH_FILES:
            batches.append(small)
            small = []
    if small:
        batches.append(small)
    return batches


def hash_files(
    jobs: Sequence[Job],
    sizes: dict[str, int],
    *,
    workers: int | None = None,
    progress: Advance | None = None,
) -> tuple[dict[str, Digests], dict[str, str]]:
    """Digests of every job's file, and the error text for each that failed."""
    digests: dict[str, Digests] = {}
    errors: dict[str, str] = {}
    if not jobs:
        return digests, errors
    batches = _batches(jobs, sizes)
    count = workers or default_workers()
    if count <= 1 or len(batches) == 1:
        results = [_hash_batch(b) for b in batches]
        for res in results:
            _collect(res, digests, errors, progress)
        return digests, errors
    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="tg-hash") as pool:
        futures = [pool.submit(_hash_batch, b) for b in batches]
        for future in as_completed(futures):
            _collect(future.result(), digests, errors, progress)
    return digests, errors


def _collect(
    results: list[tuple[str, Digests | str]],
    digests: dict[str, Digests],
    errors: dict[str, str],
    progress: Advance | None,
) -> None:
    done = 0
    for path, result in results:
        if isinstance(result, Digests):
            digests[path] = result
            done += result.size
        else:
            errors[path] = result
    if progress is not None:
        progress(done)


class Progress(Protocol):
    """Where long phases report how far they got (the CLI draws a bar on stderr)."""

    def start(self, phase: str, total: int | None) -> None: ...

    def advance(self, amount: int) -> None: ...


def hash_wanted(
    wanted: dict[str, frozenset[str]],
    sizes: dict[str, int],
    present: dict[str, str],
    cache: DigestCache | None,
    workers: int | None,
    progress: Progress | None,
    stats: dict[str, Entry | None] | None = None,
) -> tuple[dict[str, Digests], dict[str, str], int]:
    """Digests for every path in ``wanted`` (path -> algorithms), from the cache
    where its stat is unchanged; also the errors, and the bytes actually read.

    Every stat taken goes into ``stats``, for later checks to reuse.
    """
    if stats is None:
        stats = {}
    digests: dict[str, Digests] = {}
    errors: dict[str, str] = {}
    jobs: list[Job] = []
    for path, algorithms in wanted.items():
        kind = present.get(path)
        if kind == SPECIAL:
            errors[path] = "not a regular file"  # never opened: a device read can act
            continue
        # Outside the walked folders (a RECORD row may point anywhere) the kind
        # is unknown: stat first, so that no device is ever opened.
        if cache is not None or kind != FILE:
            entry = entry_in(stats, path)
            if entry is None:
                continue  # missing: whoever expected it reports it
            if not entry.regular:
                errors[path] = "not a regular file"
                continue
            sizes[path] = entry.size
            if cache is not None:
                hit = cache.digests(path, entry.identity, algorithms)
                if hit:
                    digests[path] = Digests(entry.size, entry.identity, hit)
                    continue
        jobs.append((path, algorithms))
    if progress is not None:
        progress.start("hashing", sum(sizes.get(p, 0) for p, _ in jobs))
    fresh, failed = hash_files(
        jobs, sizes, workers=workers, progress=progress.advance if progress else None
    )
    errors.update(failed)
    digests.update(fresh)
    if cache is not None:
        for path, got in fresh.items():
            cache.remember(path, got.key, got.values)
    return digests, errors, sum(d.size for d in fresh.values())
