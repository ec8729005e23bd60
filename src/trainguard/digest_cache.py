"""Digests and pyc verdicts remembered between runs, keyed on each file's identity.

One cache for the environment check and model signing alike: a re-verify of
an unchanged torch environment then costs a stat per file instead of reading
1.4 GB and recompiling 10,000 modules, and re-sealing a model re-reads only
the shards of files that changed.  An entry holds the file's
:class:`~trainguard.filestate.Identity` (device, inode, size, mtime, ctime):
an edit changes the ctime even when the editor puts the mtime back, and ctime
cannot be set back without changing the clock.  So a remembered digest is used
only for the very same file in the very same state.

What it cannot see: a change that leaves size, mtime *and* ctime as they were
(a write to the raw block device, a clock set back by root, a filesystem that
does not keep ctime).  ``--full`` (``read=False``) hashes everything.  A file
changed in the last minute is not remembered (:data:`trainguard.filestate.RACY_NS`).

One file per environment or model folder (:func:`default_cache_path`), in the
invoking user's cache folder, written atomically with mode 0600 and holding
only what the last run used, so it never grows beyond one tree's worth.  It
is only as trustworthy as its file: anyone who can write it can make a changed
file verify, so a file another user owns or others can write is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence

from trainguard.filestate import Identity, settled

FORMAT = 3
# A cache is metadata about the tree: a few MB for torch.  Anything much
# larger was not written by us.
MAX_CACHE_BYTES = 256 * 1024 * 1024


def default_cache_path(kind: str, roots: Iterable[str]) -> str:
    """``$XDG_CACHE_HOME/trainguard/KIND-ID.json``, one per interpreter and set of roots."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    # The real interpreter: a venv's python and python3 are links to the same one.
    interpreter = os.path.realpath(sys.executable)
    ident = hashlib.sha256(
        "\0".join([interpreter, *sorted(roots)]).encode("utf-8", "surrogateescape")
    ).hexdigest()[:20]
    return os.path.join(base, "trainguard", f"{kind}-{ident}.json")


def interpreter_tag() -> str:
    from importlib.util import MAGIC_NUMBER

    return f"{sys.implementation.cache_tag}:{MAGIC_NUMBER.hex()}"


def _label(algorithm: str, shard_size: int) -> str:
    return algorithm if not shard_size else f"{algorithm}/{shard_size}"


class DigestCache:
    """Read on first use, written by :meth:`save` with only what this object used.

    Entries are flat strings (``"dev,ino,size,mtime,ctime|sha256=hex,..."``)
    so that loading a torch environment's 30,000 of them is one cheap parse.
    A whole file's digest is stored under its algorithm's name, a sharded
    file's under ``ALGORITHM/SHARD_SIZE`` with the shards' digests joined by ``:``.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, read: bool = True) -> None:
        """``path``: the cache file (see :func:`default_cache_path`); None keeps the
        cache in memory, for the runs of one process."""
        self.path = os.fspath(path) if path is not None else None
        self.read = read
        self.disabled: str | None = None  # why a cache file there was not used
        self._files: dict[str, str] = {}
        self._pycs: dict[str, str] = {}
        self._new_files: dict[str, str] = {}
        self._new_pycs: dict[str, str] = {}
        self._loaded = not (self.path is not None and read)
        self._pycs_used = False  # a run with the pyc check off keeps the old verdicts
        self.hits = 0

    # -- whole-file digests (the environment check) ---------------------------
    def digests(self, path: str, key: Identity, algorithms: frozenset[str]) -> dict[str, bytes]:
        """The remembered digests of ``path`` if its stat is unchanged and all are known."""
        found = self._lookup(path, key, algorithms)
        if found is None or len(found) != len(algorithms):
            return {}
        values: dict[str, bytes] = {}
        for name, digests in found.items():
            if len(digests) != 1:
                return {}
            values[name] = digests[0]
        self.hits += 1
        return values

    def remember(
        self, path: str, key: Identity, values: dict[str, bytes], hashed_at_ns: int | None = None
    ) -> bool:
        """Remember whole-file digests; False (not stored) when the file changed too
        recently before ``hashed_at_ns`` (by default now)."""
        return self._store(path, key, {a: [v] for a, v in values.items()}, hashed_at_ns)

    # -- digests of a file or of its shards (model signing) -------------------
    def get(
        self, path: str, ident: Identity, algorithm: str, shard_size: int
    ) -> list[bytes] | None:
        label = _label(algorithm, shard_size)
        found = self._lookup(path, ident, frozenset([label]))
        if not found or label not in found:
            return None
        self.hits += 1
        return found[label]

    def put(
        self,
        path: str,
        ident: Identity,
        algorithm: str,
        shard_size: int,
        digests: Sequence[bytes],
        hashed_at_ns: int,
    ) -> bool:
        """Remember ``digests``; False (not stored) when the file changed too recently."""
        return self._store(
            path, ident, {_label(algorithm, shard_size): list(digests)}, hashed_at_ns
        )

    def commit(self) -> None:
        self.save()

    def close(self) -> None:
        self.save()

    def _lookup(
        self, path: str, key: Identity, labels: frozenset[str]
    ) -> dict[str, list[bytes]] | None:
        self._ensure_loaded()
        cached = self._new_files.get(path) or self._files.get(path)
        if not isinstance(cached, str):
            return None
        prefix = key.text() + "|"
        if not cached.startswith(prefix):
            return None
        values: dict[str, list[bytes]] = {}
        try:
            for item in cached[len(prefix) :].split(","):
                name, _, digests = item.partition("=")
                if name in labels:
                    values[name] = [bytes.fromhex(d) for d in digests.split(":")]
        except ValueError:
            return None
        self._new_files[path] = cached  # used: kept by the next save
        return values

    def _store(
        self, path: str, key: Identity, values: dict[str, list[bytes]], hashed_at_ns: int | None
    ) -> bool:
        if not settled(key.ctime_ns, time.time_ns() if hashed_at_ns is None else hashed_at_ns):
            return False
        # Other labels of the same file in the same state stay (a file sealed
        # with two shard sizes); a changed state drops them.
        self._ensure_loaded()
        prefix = key.text() + "|"
        kept: dict[str, str] = {}
        old = self._new_files.get(path) or self._files.get(path) or ""
        if old.startswith(prefix):
            for item in old[len(prefix) :].split(","):
                name, _, text = item.partition("=")
                kept[name] = text
        for name, digests in values.items():
            kept[name] = ":".join(d.hex() for d in digests)
        self._new_files[path] = prefix + ",".join(f"{n}={d}" for n, d in sorted(kept.items()))
        return True

    # -- pyc verdicts (the environment check) ----------------------------------
    def pyc_verified(self, pyc: str, pyc_key: Identity, src_key: Identity) -> bool:
        self._ensure_loaded()
        self._pycs_used = True
        cached = self._pycs.get(pyc)
        if cached != f"{pyc_key.text()}|{src_key.text()}":
            return False
        self._new_pycs[pyc] = cached
        self.hits += 1
        return True

    def remember_pyc(self, pyc: str, pyc_key: Identity, src_key: Identity) -> None:
        self._pycs_used = True
        now = time.time_ns()
        if settled(pyc_key.ctime_ns, now) and settled(src_key.ctime_ns, now):
            self._new_pycs[pyc] = f"{pyc_key.text()}|{src_key.text()}"

    # -- whole verdicts (see :mod:`trainguard.env.verdict`) --------------------
    def verdict_path(self, variant: str) -> str | None:
        """Where the last verify's verdict for one set of options is kept: one file
        per set, so alternating options do not evict each other."""
        if self.path is None:
            return None
        stem = self.path[: -len(".json")] if self.path.endswith(".json") else self.path
        return f"{stem}.verdict-{variant}.json"

    def read_verdict(self, variant: str) -> object:
        """The stored verdict document, or None (never read with ``read=False``)."""
        path = self.verdict_path(variant)
        if not self.read or path is None:
            return None
        return _read_json(path)[0]

    def write_verdict(self, variant: str, doc: dict[str, object]) -> None:
        path = self.verdict_path(variant)
        if path is not None:
            _write_json(path, doc)

    # -- the file ---------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        # Read on first use: a reused verdict never needs the digests.
        if self._loaded:
            return
        self._loaded = True
        assert self.path is not None
        doc, why = _read_json(self.path)
        if why is not None:
            self.disabled = f"digest cache {self.path} not usable: {why}"
            return
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            return  # an older format, or none: start afresh
        if doc.get("interpreter") != interpreter_tag():
            return
        files, pycs = doc.get("files"), doc.get("pycs")
        if not isinstance(files, dict) or not isinstance(pycs, dict):
            return
        # Values are checked where they are used: a bad one is a miss.
        self._files = files
        self._pycs = pycs

    def _pycs_now(self) -> dict[str, str]:
        return self._new_pycs if self._pycs_used else self._pycs

    def save(self) -> None:
        """Write the cache atomically; a failure only costs speed next time."""
        if self.path is None or not (self._loaded or self._new_files or self._new_pycs):
            return
        self._ensure_loaded()
        # An unchanged tree re-verified: every entry read was used and confirmed,
        # none added; rewriting the same file would only cost time.
        if self._new_files == self._files and self._pycs_now() == self._pycs:
            return
        doc = {
            "format": FORMAT,
            "interpreter": interpreter_tag(),
            "files": self._new_files,
            "pycs": self._pycs_now(),
        }
        _write_json(self.path, doc)
        self._files, self._pycs = dict(self._new_files), dict(self._pycs_now())


def _read_json(path: str) -> tuple[object, str | None]:
    """The JSON document at ``path`` if we wrote it and no one else could have, and
    else None with the reason (none when the file is simply not there)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, exc.strerror or str(exc)
    with os.fdopen(fd, "rb") as fh:
        why = _untrusted(os.fstat(fh.fileno()))
        if why is not None:
            return None, why
        raw = fh.read(MAX_CACHE_BYTES + 1)
    try:
        return json.loads(raw), None
    except (ValueError, RecursionError):
        return None, "not a cache document"


def _untrusted(st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CACHE_BYTES:
        return "not a regular file of a cache's size"
    getuid = getattr(os, "getuid", None)
    if getuid is not None and st.st_uid != getuid():
        return "owned by another user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "others can write it"
    return None


def _write_json(path: str, doc: dict[str, object]) -> None:
    """Write atomically with mode 0600; a failure only costs speed next time."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".cache-", suffix=".tmp", dir=folder)
    except OSError:
        return
    try:
        # dumps, not dump: only dumps uses the C encoder.
        text = json.dumps(doc, separators=(",", ":"))
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
