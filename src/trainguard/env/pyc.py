"""Is each cached ``.pyc`` the compiled form of the source beside it?

RECORD files list ``.pyc`` without a hash, and the interpreter trusts a
``.pyc`` whose header repeats its source's mtime and size (or whose hash-based
header it was told not to check): a swapped ``.pyc`` runs while the ``.py``
verifies clean.  So each one is checked by compiling its source the way
importlib does (``compile(source_bytes, path, "exec", dont_inherit=True,
optimize=N)``) and comparing the code with the payload after the 16-byte
header.  The source is compiled, never executed.

``marshal.dumps`` output is not canonical (reference flags follow object
refcounts, and frozenset order can differ), so when the bytes differ the
payload is unmarshalled and the two code objects are compared field by field,
``co_filename`` aside (import rewrites it; it is the path the file was compiled
at).  Unmarshalling is the same parse the interpreter does at every import of
that file; in large checks it runs in worker processes, so a payload crafted
to crash it takes down a worker, which is reported, not the verifier.
"""

from __future__ import annotations

import marshal
import os
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.util import MAGIC_NUMBER, source_hash
from types import CodeType
from typing import Any

from trainguard.filestate import Identity, default_workers

HEADER = 16
MAX_SOURCE_BYTES = 32 * 1024 * 1024
MAX_PYC_BYTES = 64 * 1024 * 1024

MATCH = "match"  # the code is its source's
MISMATCH = "mismatch"  # other code, and the interpreter would load it
UNUSED = "unused"  # other code (or unreadable), but the interpreter would not load it
UNREADABLE = "unreadable"  # the interpreter would load it, and it cannot be parsed
NO_SOURCE = "no-source"
TOO_LARGE = "too-large"


@dataclass(frozen=True)
class PycJob:
    pyc: str
    source: str
    optimize: int


@dataclass(frozen=True)
class PycVerdict:
    pyc: str
    status: str
    detail: str = ""
    source: str = ""
    # The stats of the files compared (not of whatever is there now), when read.
    source_key: Identity | None = None
    pyc_key: Identity | None = None


def optimization_of(name: str) -> int | None:
    """0, 1 or 2 for ``mod.<tag>[.opt-N].pyc`` of this interpreter, else ``None``."""
    tag = sys.implementation.cache_tag
    if tag is None or not name.endswith(".pyc"):
        return None
    stem = name[: -len(".pyc")]
    for level, suffix in ((1, ".opt-1"), (2, ".opt-2")):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            return level if stem.endswith("." + tag) else None
    return 0 if stem.endswith("." + tag) else None


def would_load(header: bytes, source: bytes, source_stat: os.stat_result) -> bool:
    """Whether importlib would use this pyc rather than recompile its source."""
    if header[:4] != MAGIC_NUMBER:
        return False
    flags = int.from_bytes(header[4:8], "little")
    if flags & ~0b11:
        return False  # importlib refuses unknown flags and recompiles
    if flags & 0b1:
        import _imp

        mode = getattr(_imp, "check_hash_based_pycs", "default")
        check = mode == "always" or (mode != "never" and bool(flags & 0b10))
        return not check or header[8:16] == source_hash(source)
    mtime = int(source_stat.st_mtime) & 0xFFFFFFFF
    size = source_stat.st_size & 0xFFFFFFFF
    return header[8:12] == mtime.to_bytes(4, "little") and header[12:16] == size.to_bytes(
        4, "little"
    )


_CODE_FIELDS = tuple(
    name
    for name in (
        "co_argcount",
        "co_posonlyargcount",
        "co_kwonlyargcount",
        "co_nlocals",
        "co_stacksize",
        "co_flags",
        "co_firstlineno",
        "co_code",
        "co_names",
        "co_varnames",
        "co_freevars",
        "co_cellvars",
        "co_name",
        "co_qualname",
        "co_linetable",
        "co_exceptiontable",
    )
    if hasattr(CodeType, name)
)


def _const_key(value: object) -> tuple[str, str]:
    return (type(value).__name__, repr(value))


def same_const(a: object, b: object) -> bool:
    if type(a) is not type(b):
        return False  # 1, 1.0 and True compare equal but compile differently
    if isinstance(a, CodeType) and isinstance(b, CodeType):
        return same_code(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(map(same_const, a, b))
    if isinstance(a, frozenset) and isinstance(b, frozenset):
        return sorted(map(_const_key, a)) == sorted(map(_const_key, b))
    if isinstance(a, float | complex):
        return repr(a) == repr(b)  # tells -0.0 from 0.0, and nan equals itself
    return a == b


def same_code(a: CodeType, b: CodeType) -> bool:
    """Equal in every field that changes behaviour or tracebacks, ``co_filename`` aside."""
    if any(getattr(a, name) != getattr(b, name) for name in _CODE_FIELDS):
        return False
    return same_const(a.co_consts, b.co_consts)


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def _read(path: str, limit: int) -> tuple[bytes, os.stat_result]:
    # Non-blocking open and a regular-file check: a FIFO planted as a pyc or
    # a source must not hang the check.
    fd = os.open(path, _OPEN_FLAGS)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path}: not a regular file")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit} bytes")
    return data, st


def check_pyc(job: PycJob) -> PycVerdict:
    """Compare one pyc with its freshly compiled source."""

    keys: list[Identity | None] = [None, None]

    def verdict(status: str, detail: str = "") -> PycVerdict:
        return PycVerdict(job.pyc, status, detail, job.source, keys[0], keys[1])

    try:
        source, source_stat = _read(job.source, MAX_SOURCE_BYTES)
        keys[0] = Identity.of(source_stat)
    except FileNotFoundError:
        return verdict(NO_SOURCE)
    except ValueError as exc:
        return verdict(TOO_LARGE, f"its source is {exc}")
    except OSError as exc:
        return verdict(UNREADABLE, f"its source cannot be read: {exc.strerror or exc}")
    try:
        data, pyc_stat = _read(job.pyc, MAX_PYC_BYTES)
        keys[1] = Identity.of(pyc_stat)
    except ValueError as exc:
        return verdict(TOO_LARGE, f"it is {exc}")
    except OSError as exc:
        return verdict(UNREADABLE, f"it cannot be read: {exc.strerror or exc}")
    if len(data) < HEADER:
        return verdict(UNUSED, "shorter than a pyc header")
    loaded = would_load(data[:HEADER], source, source_stat)
    try:
        expected = compile(source, job.source, "exec", dont_inherit=True, optimize=job.optimize)
    except (SyntaxError, ValueError) as exc:
        # The interpreter never compiles this source, so a pyc it loads for
        # it is someone else's code.
        return verdict(MISMATCH if loaded else UNUSED, f"its source does not compile ({exc})")
    payload = data[HEADER:]
    if marshal.dumps(expected) == payload:
        return verdict(MATCH)
    try:
        actual = marshal.loads(payload)  # noqa: S302 - the parse every import of it does
    except (EOFError, ValueError, TypeError) as exc:
        return verdict(UNREADABLE if loaded else UNUSED, f"its code does not unmarshal ({exc})")
    try:
        same = isinstance(actual, CodeType) and same_code(actual, expected)
    except RecursionError:
        same = False
    if same:
        return verdict(MATCH)
    return verdict(MISMATCH if loaded else UNUSED, "its code is not what its source compiles to")


def _check_batch(jobs: Sequence[PycJob]) -> list[PycVerdict]:
    return [check_pyc(job) for job in jobs]


# Below this many pycs the cost of starting workers is not worth it.
IN_PROCESS_MAX = 64
BATCH = 32


def _ping() -> bool:
    return True


def _run_pool(
    batches: list[list[PycJob]],
    count: int,
    context: Any,
    progress: Callable[[int], None] | None,
) -> tuple[list[PycVerdict], list[list[PycJob]]]:
    """Verdicts of the batches that completed, and the batches whose worker died."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    verdicts: list[PycVerdict] = []
    failed: list[list[PycJob]] = []
    with ProcessPoolExecutor(max_workers=count, mp_context=context) as pool:
        futures = {pool.submit(_check_batch, batch): batch for batch in batches}
        for future in as_completed(futures):
            batch = futures[future]
            try:
                verdicts.extend(future.result())
            except BrokenProcessPool:
                failed.append(batch)
                continue
            if progress is not None:
                progress(len(batch))
    return verdicts, failed


def _workers_start(context: Any) -> bool:
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            return bool(pool.submit(_ping).result())
    except (BrokenProcessPool, OSError):
        return False


def check_pycs(
    jobs: Sequence[PycJob],
    *,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[PycVerdict]:
    """Verdicts for ``jobs``; compiling holds the GIL, so workers are processes.

    When a worker dies (a pyc crafted to crash the unmarshaller, or a kill),
    the batches it took down are checked again one pyc per fresh worker, so
    that only the culprit is reported unreadable.  When no worker can start
    at all (a caller's unguarded ``__main__`` under the spawn method, process
    limits), the check runs in this process instead.
    """
    count = workers or default_workers()
    if count <= 1 or len(jobs) <= IN_PROCESS_MAX:
        return _in_process(jobs, progress)
    import multiprocessing

    # spawn: forking a process that runs threads (the progress bar) can
    # deadlock the child.
    context = multiprocessing.get_context("spawn")
    batches = [list(jobs[i : i + BATCH]) for i in range(0, len(jobs), BATCH)]
    verdicts, failed = _run_pool(batches, count, context, progress)
    if not failed:
        return verdicts
    retry = [job for batch in failed for job in batch]
    if not _workers_start(context):
        return verdicts + _in_process(retry, progress)
    for job in retry:
        done, crashed = _run_pool([[job]], 1, context, progress)
        verdicts.extend(done)
        if crashed:
            verdicts.append(
                PycVerdict(job.pyc, UNREADABLE, "checking it crashed a worker process", job.source)
            )
            if progress is not None:
                progress(1)
    return verdicts


def _in_process(jobs: Sequence[PycJob], progress: Callable[[int], None] | None) -> list[PycVerdict]:
    out: list[PycVerdict] = []
    for job in jobs:
        out.append(check_pyc(job))
        if progress is not None:
            progress(1)
    return out
