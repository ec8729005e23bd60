"""Remember file digests so that re-sealing or re-verifying skips unchanged files.

An entry is keyed on the file's absolute path, device, inode, size, mtime and
ctime (nanoseconds) and on the hash algorithm and shard size.  Writing a file
changes its mtime and ctime; ``touch -d`` can set the mtime back but not the
ctime, which only the kernel sets.  So a cached digest is used only for the
very same file in the very same state.

What it cannot see: a change that leaves size, mtime *and* ctime as they were
(a write to the raw block device, a clock set back by root, a filesystem that
does not keep ctime).  ``--full`` (``cache=None`` in the API) hashes everything.

Timestamps have a granularity, so a file written in the same tick as it was
hashed could change without changing them, and writes through a shared memory
mapping to a page that is already dirty change them not at all until the page
is written back.  Like git's "racily clean" entries, a digest is therefore only
stored when the file's last change is older than :data:`RACY_MARGIN_NS` (the
environment check's window, see :data:`trainguard.env.walk.RACY_NS`) at
hashing time.

The database lives outside the model folder (``$XDG_CACHE_HOME/trainguard/
digests.sqlite``, mode 0600): anyone who can write it can make a changed file
verify, so it must be as private as the user's home.  A cache that cannot be
opened or written is switched off, and the run goes on hashing everything.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from trainguard.env.walk import RACY_NS
from trainguard.signing.hashing import Identity

if TYPE_CHECKING:
    import sqlite3

RACY_MARGIN_NS = RACY_NS
MAX_ROWS = 2_000_000  # least recently used rows beyond this are dropped
_SCHEMA = """
CREATE TABLE IF NOT EXISTS digests (
    path TEXT NOT NULL, dev INTEGER NOT NULL, ino INTEGER NOT NULL,
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,
    algorithm TEXT NOT NULL, shard_size INTEGER NOT NULL,
    digests BLOB NOT NULL, used_ns INTEGER NOT NULL,
    PRIMARY KEY (path, algorithm, shard_size)
)
"""


def default_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trainguard" / "digests.sqlite"


class DigestCache:
    """Digests of whole files (one) or of their shards (several, in order)."""

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, racy_margin_ns: int = RACY_MARGIN_NS
    ) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.racy_margin_ns = racy_margin_ns
        self.disabled: str | None = None  # why the cache was switched off
        self._db: sqlite3.Connection | None = None
        self._pending: list[tuple[object, ...]] = []

    def _connect(self) -> sqlite3.Connection | None:
        if self._db is not None or self.disabled:
            return self._db
        import sqlite3  # not at import time: most runs of trainguard never seal

        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
            os.close(fd)
            db = sqlite3.connect(self.path, timeout=10)
            db.execute(_SCHEMA)
            db.commit()
        except (OSError, sqlite3.Error) as exc:
            self.disabled = f"digest cache {self.path} not usable: {exc}"
            return None
        self._db = db
        return db

    def get(
        self, path: str, ident: Identity, algorithm: str, shard_size: int
    ) -> list[bytes] | None:
        db = self._connect()
        if db is None:
            return None
        import sqlite3

        try:
            row = db.execute(
                "SELECT dev, ino, size, mtime_ns, ctime_ns, digests FROM digests "
                "WHERE path = ? AND algorithm = ? AND shard_size = ?",
                (path, algorithm, shard_size),
            ).fetchone()
        except sqlite3.Error as exc:
            self.disabled = f"digest cache {self.path} not usable: {exc}"
            return None
        if row is None or tuple(row[:5]) != (
            ident.dev,
            ident.ino,
            ident.size,
            ident.mtime_ns,
            ident.ctime_ns,
        ):
            return None
        blob: bytes = row[5]
        width = 64 if algorithm == "blake2b" else 32
        if not blob or len(blob) % width:
            return None
        self._pending.append(("touch", path, algorithm, shard_size))
        return [blob[i : i + width] for i in range(0, len(blob), width)]

    def put(
        self,
        path: str,
        ident: Identity,
        algorithm: str,
        shard_size: int,
        digests: Iterable[bytes],
        hashed_at_ns: int,
    ) -> bool:
        """Remember ``digests``; False (not stored) when the file changed too recently."""
        if max(ident.mtime_ns, ident.ctime_ns) > hashed_at_ns - self.racy_margin_ns:
            return False
        row = (
            path,
            ident.dev,
            ident.ino,
            ident.size,
            ident.mtime_ns,
            ident.ctime_ns,
            algorithm,
            shard_size,
            b"".join(digests),
        )
        self._pending.append(("put", *row))
        return True

    def commit(self) -> None:
        db = self._connect()
        pending, self._pending = self._pending, []
        if db is None or not pending:
            return
        import sqlite3

        now = time.time_ns()
        try:
            with db:
                for op, *row in pending:
                    if op == "put":
                        db.execute(
                            "INSERT OR REPLACE INTO digests VALUES (?,?,?,?,?,?,?,?,?,?)",
                            (*row, now),
                        )
                    else:
                        db.execute(
                            "UPDATE digests SET used_ns = ? "
                            "WHERE path = ? AND algorithm = ? AND shard_size = ?",
                            (now, *row),
                        )
                (count,) = db.execute("SELECT COUNT(*) FROM digests").fetchone()
                if count > MAX_ROWS:
                    db.execute(
                        "DELETE FROM digests WHERE rowid IN (SELECT rowid FROM digests "
                        "ORDER BY used_ns LIMIT ?)",
                        (count - MAX_ROWS,),
                    )
        except sqlite3.Error as exc:
            self.disabled = f"digest cache {self.path} not usable: {exc}"

    def close(self) -> None:
        self.commit()
        if self._db is not None:
            self._db.close()
            self._db = None
