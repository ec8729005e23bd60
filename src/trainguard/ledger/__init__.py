"""The ledger: an append-only, hash-chained record of what happened in a training run.

Each rank appends to its own stream (``stream`` = rank; -1 for records of
the run as a whole); each record carries the digest of the one before it, so
an edited, deleted or reordered record breaks the chain, and a signed head
(:meth:`Ledger.sign_head`) makes the chain up to it unforgeable without the
signing key, which catches a rewritten or truncated chain too.

    ledger = open_ledger("run.db")                      # or postgresql://...
    ledger.append("run-1", "step", {"loss": 2.3}, step=0, stream=0)
    ledger.sign_head("run-1", 0, "signing.pem")
    findings = verify_ledger(ledger, "run-1", "signing.pub")  # [] when intact

The canonical encoding, the tables and the checks are described in
``docs/ledger.md``.
"""

from __future__ import annotations

import re

from trainguard.errors import UsageError
from trainguard.ledger.chain import GENESIS, HEAD_KIND, RUN_STREAM, LedgerError, Record
from trainguard.ledger.interface import Ledger
from trainguard.ledger.verify import verify_ledger

_SQLITE_PREFIX = "sqlite:///"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")
_POSTGRES_PREFIXES = ("postgresql://", "postgres://")


def open_ledger(url: str, *, create: bool = True) -> Ledger:
    """The ledger at ``url``.

    ``url`` is a file path or ``sqlite:///PATH`` (``sqlite:////abs/path``, as
    SQLAlchemy writes it; ``?synchronous=full`` fsyncs each append), or a
    ``postgresql://`` URL (needs ``trainguard[postgres]``).  With ``create``
    False, a ledger that does not exist yet is an error instead of being made.
    """
    if not isinstance(url, str) or not url:
        raise UsageError("the ledger URL is empty")
    if url.startswith(_POSTGRES_PREFIXES):
        from trainguard.ledger.postgres_store import PostgresLedger

        return PostgresLedger(url, create=create)
    synchronous = "normal"
    path = url
    if url.startswith(_SQLITE_PREFIX):
        path, _, query = url[len(_SQLITE_PREFIX) :].partition("?")
        for item in filter(None, query.split("&")):
            name, _, value = item.partition("=")
            if name != "synchronous":
                raise UsageError(f"unknown SQLite ledger option {name!r} (known: synchronous)")
            synchronous = value
        if not path:
            raise UsageError("sqlite:/// URL names no file")
        if synchronous.lower() not in ("normal", "full"):
            raise UsageError(f"synchronous={synchronous!r}: expected normal or full")
    elif _SCHEME.match(url):
        raise UsageError(
            f"unsupported ledger URL {url.split(':', 1)[0]}:... "
            "(expected a file path, sqlite:///PATH or postgresql://...)"
        )
    from trainguard.ledger.sqlite_store import SqliteLedger

    return SqliteLedger(path, create=create, synchronous=synchronous)


__all__ = [
    "GENESIS",
    "HEAD_KIND",
    "RUN_STREAM",
    "Ledger",
    "LedgerError",
    "Record",
    "open_ledger",
    "verify_ledger",
]
