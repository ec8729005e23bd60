"""Digests and pyc verdicts remembered between runs, keyed on each file's stat.

A re-verify of an unchanged environment then costs a stat per file instead of
reading 1.4 GB and recompiling 10,000 modules.  The key holds the inode,
size, mtime and ctime: an edit changes the ctime even when the editor puts
the mtime back, and ctime cannot be set back without changing the clock.

The cache is only as trustworthy as its file: it lives in the invoking
user's cache folder, is written with mode 0600, and is ignored when another
user owns it or others can write to it.  ``--full`` ignores it entirely.
A file changed in the last seconds is not remembered (see :data:`RACY_NS`).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import tempfile
import time
from collections.abc import Iterable

from trainguard.env.walk import StatKey, key_text, settled

FORMAT = 2
# A cache is metadata about the environment: a few MB for torch.  Anything
# much larger was not written by us.
MAX_CACHE_BYTES = 256 * 1024 * 1024


def default_cache_path(roots: Iterable[str]) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    # The real interpreter: a venv's python and python3 are links to the same one.
    interpreter = os.path.realpath(sys.executable)
    ident = hashlib.sha256(
        "\0".join([interpreter, *sorted(roots)]).encode("utf-8", "surrogateescape")
    ).hexdigest()[:20]
    return os.path.join(base, "trainguard", f"env-{ident}.json")


def interpreter_tag() -> str:
    from importlib.util import MAGIC_NUMBER

    return f"{sys.implementation.cache_tag}:{MAGIC_NUMBER.hex()}"


def _trusted(fd: int) -> bool:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CACHE_BYTES:
        return False
    getuid = getattr(os, "getuid", None)
    if getuid is not None and st.st_uid != getuid():
        return False
    return not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


class DigestCache:
    """Read on first use, written at the end with only what this run used.

    Entries are flat strings (``"dev,ino,size,mtime,ctime|sha256=hex,..."``)
    so that loading a torch environment's 30,000 of them is one cheap parse.
    """

    def __init__(self, path: str | None, *, read: bool = True) -> None:
        self.path = path
        self.read = read
        self._files: dict[str, str] = {}
        self._pycs: dict[str, str] = {}
        self._new_files: dict[str, str] = {}
        self._new_pycs: dict[str, str] = {}
        self._loaded = not (path is not None and read)
        self._pycs_used = False  # a run with the pyc check off keeps the old verdicts
        self.hits = 0

    def verdict_path(self, variant: str) -> str | None:
        """Where the last verify's verdict for one set of options is kept (see
        :mod:`.env_verdict`): one file per set, so alternating options do not evict."""
        if self.path is None:
            return None
        stem = self.path[: -len(".json")] if self.path.endswith(".json") else self.path
        return f"{stem}.verdict-{variant}.json"

    def read_verdict(self, variant: str) -> object:
        """The stored verdict document, or None (never read with ``read=False``)."""
        path = self.verdict_path(variant)
        if not self.read or path is None:
            return None
        return _read_json(path)

    def write_verdict(self, variant: str, doc: dict[str, object]) -> None:
        path = self.verdict_path(variant)
        if path is not None:
            _write_json(path, doc)

    def _ensure_loaded(self) -> None:
        # Read on first use: a reused verdict never needs the digests.
        if self._loaded:
            return
        self._loaded = True
        assert self.path is not None
        doc = _read_json(self.path)
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            return
        if doc.get("interpreter") != interpreter_tag():
            return
        files, pycs = doc.get("files"), doc.get("pycs")
        if not isinstance(files, dict) or not isinstance(pycs, dict):
            return
        # Values are checked where they are used: a bad one is a miss.
        self._files = files
        self._pycs = pycs

    def digests(self, path: str, key: StatKey, algorithms: frozenset[str]) -> dict[str, bytes]:
        """The remembered digests of ``path`` if its stat is unchanged and all are known."""
        self._ensure_loaded()
        cached = self._files.get(path)
        if not isinstance(cached, str):
            return {}
        prefix = key_text(key) + "|"
        if not cached.startswith(prefix):
            return {}
        values: dict[str, bytes] = {}
        try:
            for item in cached[len(prefix) :].split(","):
                name, _, digest = item.partition("=")
                if name in algorithms:
                    values[name] = bytes.fromhex(digest)
        except ValueError:
            return {}
        if len(values) != len(algorithms):
            return {}
        self._new_files[path] = cached
        self.hits += 1
        return values

    def remember(self, path: str, key: StatKey, values: dict[str, bytes]) -> None:
        if not settled(key[4], time.time_ns()):
            return
        digests = ",".join(f"{a}={v.hex()}" for a, v in sorted(values.items()))
        self._new_files[path] = f"{key_text(key)}|{digests}"

    def pyc_verified(self, pyc: str, pyc_key: StatKey, src_key: StatKey) -> bool:
        self._ensure_loaded()
        self._pycs_used = True
        cached = self._pycs.get(pyc)
        if cached != f"{key_text(pyc_key)}|{key_text(src_key)}":
            return False
        self._new_pycs[pyc] = cached
        self.hits += 1
        return True

    def remember_pyc(self, pyc: str, pyc_key: StatKey, src_key: StatKey) -> None:
        self._pycs_used = True
        now = time.time_ns()
        if not (settled(pyc_key[4], now) and settled(src_key[4], now)):
            return
        self._new_pycs[pyc] = f"{key_text(pyc_key)}|{key_text(src_key)}"

    def _changed(self) -> bool:
        # An unchanged environment re-verified: every entry read was used and
        # confirmed, none added; rewriting the same file would only cost time.
        return self._new_files != self._files or self._pycs_now() != self._pycs

    def _pycs_now(self) -> dict[str, str]:
        return self._new_pycs if self._pycs_used else self._pycs

    def save(self) -> None:
        """Write the cache atomically; a failure only costs speed next time."""
        if self.path is None or not (self._loaded or self._new_files or self._new_pycs):
            return
        self._ensure_loaded()
        if not self._changed():
            return
        doc = {
            "format": FORMAT,
            "interpreter": interpreter_tag(),
            "files": self._new_files,
            "pycs": self._pycs_now(),
        }
        _write_json(self.path, doc)


def _read_json(path: str) -> object:
    """The JSON document at ``path`` if we wrote it and no one else could have; else None."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not _trusted(fh.fileno()):
            return None
        raw = fh.read(MAX_CACHE_BYTES + 1)
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _write_json(path: str, doc: dict[str, object]) -> None:
    """Write atomically with mode 0600; a failure only costs speed next time."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".env-", suffix=".tmp", dir=folder)
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
