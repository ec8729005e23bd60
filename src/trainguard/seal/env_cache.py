"""Digests and pyc verdicts remembered between runs, keyed on each file's stat.

A re-verify of an unchanged environment then costs a stat per file instead of
reading 1.4 GB and recompiling 10,000 modules.  The key holds the inode,
size, mtime and ctime: an edit changes the ctime even when the editor puts
the mtime back, and ctime cannot be set back without changing the clock.

The cache is only as trustworthy as its file: it lives in the invoking
user's cache folder, is written with mode 0600, and is ignored when another
user owns it or others can write to it.  ``--full`` ignores it entirely.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterable

from trainguard.seal.env_walk import StatKey

FORMAT = 2
# A cache is metadata about the environment: a few MB for torch.  Anything
# much larger was not written by us.
MAX_CACHE_BYTES = 256 * 1024 * 1024


def default_cache_path(roots: Iterable[str]) -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    ident = hashlib.sha256(
        "\0".join([sys.executable, *sorted(roots)]).encode("utf-8", "surrogateescape")
    ).hexdigest()[:20]
    return os.path.join(base, "trainguard", f"env-{ident}.json")


def _interpreter_tag() -> str:
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


def _key_text(key: StatKey) -> str:
    return ",".join(map(str, key))


class DigestCache:
    """Read at start, written at the end with only what this run used.

    Entries are flat strings (``"dev,ino,size,mtime,ctime|sha256=hex,..."``)
    so that loading a torch environment's 30,000 of them is one cheap parse.
    """

    def __init__(self, path: str | None, *, read: bool = True) -> None:
        self.path = path
        self._files: dict[str, str] = {}
        self._pycs: dict[str, str] = {}
        self._new_files: dict[str, str] = {}
        self._new_pycs: dict[str, str] = {}
        self.hits = 0
        if path is not None and read:
            self._load(path)

    def _load(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return
        with os.fdopen(fd, "rb") as fh:
            if not _trusted(fh.fileno()):
                return
            raw = fh.read(MAX_CACHE_BYTES + 1)
        try:
            doc = json.loads(raw)
        except ValueError:
            return
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            return
        if doc.get("interpreter") != _interpreter_tag():
            return
        files, pycs = doc.get("files"), doc.get("pycs")
        if not isinstance(files, dict) or not isinstance(pycs, dict):
            return
        # Values are checked where they are used: a bad one is a miss.
        self._files = files
        self._pycs = pycs

    def digests(self, path: str, key: StatKey, algorithms: frozenset[str]) -> dict[str, bytes]:
        """The remembered digests of ``path`` if its stat is unchanged and all are known."""
        cached = self._files.get(path)
        if not isinstance(cached, str):
            return {}
        key_text, _, values_text = cached.partition("|")
        if key_text != _key_text(key):
            return {}
        values: dict[str, bytes] = {}
        try:
            for item in values_text.split(","):
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
        digests = ",".join(f"{a}={v.hex()}" for a, v in sorted(values.items()))
        self._new_files[path] = f"{_key_text(key)}|{digests}"

    def pyc_verified(self, pyc: str, pyc_key: StatKey, src_key: StatKey) -> bool:
        cached = self._pycs.get(pyc)
        if cached != f"{_key_text(pyc_key)}|{_key_text(src_key)}":
            return False
        self._new_pycs[pyc] = cached
        self.hits += 1
        return True

    def remember_pyc(self, pyc: str, pyc_key: StatKey, src_key: StatKey) -> None:
        self._new_pycs[pyc] = f"{_key_text(pyc_key)}|{_key_text(src_key)}"

    def _changed(self) -> bool:
        # An unchanged environment re-verified: every entry read was used and
        # confirmed, none added; rewriting the same file would only cost time.
        return self._new_files != self._files or self._new_pycs != self._pycs

    def save(self) -> None:
        """Write the cache atomically; a failure only costs speed next time."""
        if self.path is None or not self._changed():
            return
        doc = {
            "format": FORMAT,
            "interpreter": _interpreter_tag(),
            "files": self._new_files,
            "pycs": self._new_pycs,
        }
        folder = os.path.dirname(self.path)
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
            os.replace(tmp, self.path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
