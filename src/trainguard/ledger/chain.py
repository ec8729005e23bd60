"""Records, their canonical encoding and the hash chain that links them.

A record's digest is the SHA-256 of one line of canonical JSON holding every
field but the digest itself: keys sorted, no whitespace, ASCII only (so that
any string encodes the same way everywhere), floats written as Python's
``repr`` (the shortest text that reads back to the same double).  Each record
carries the digest of the one before it in its stream (``prev``); the first
record of a stream carries :data:`GENESIS`.

Payloads are stored as their canonical JSON text.  A payload is normalised
once, on append, by a JSON round trip (tuples become lists, integer keys become
strings), so that the record a writer gets back hashes exactly like the one a
verifier reads later from the database.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

from trainguard.errors import TrainguardError

GENESIS = "0" * 64
# Stream of the records that belong to the run as a whole (start, exit, run heads).
RUN_STREAM = -1
# The kind of the records that sign_head appends; append() refuses it.
HEAD_KIND = "head"
# Bumped if the hashed fields ever change, so that old digests never match new rules.
FORMAT_VERSION = 1
HEAD_PAYLOAD_TYPE = "application/vnd.trainguard.ledger-head+json"
HEAD_STATEMENT_TYPE = "https://trainguard.dev/ledger-head/v1"

# A writer never stores more than this in one record; a verifier treats anything
# larger as foreign (someone else wrote it) instead of reading it all.
MAX_PAYLOAD_CHARS = 4 * 1024 * 1024
MAX_KIND_CHARS = 200
MAX_RUN_ID_CHARS = 500
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
# The 64-bit columns of SQLite and PostgreSQL.
_INT64 = 2**63


class LedgerError(TrainguardError):
    """The ledger could not be opened, written or read (CLI exit code 2)."""


@dataclass(frozen=True)
class Record:
    """One entry of a run's ledger.

    ``stream`` is the rank that wrote it (each rank has its own chain), or
    :data:`RUN_STREAM` (-1) for run-level records; ``seq`` counts from 0 within
    a ``(run_id, stream)``.  ``digest`` is :func:`record_digest` of the other
    fields and ``prev`` the digest of the record before it.

    ``server_time`` is when the database server stored the record (seconds since the
    epoch, its own clock; PostgreSQL only, None elsewhere and on rows older than the
    column).  The writer cannot know it, so it is no part of the digest or of equality.
    """

    run_id: str
    stream: int
    seq: int
    kind: str
    step: int | None
    time: float
    payload: dict[str, Any]
    prev: str
    digest: str
    server_time: float | None = field(default=None, compare=False)


def canonical_json(value: Any) -> str:
    """The canonical text of a JSON value (raises ValueError if it is not one).

    Non-finite floats (a NaN loss is worth recording) are written as Python's
    json module writes them, ``NaN``/``Infinity``, which it also reads back.
    """
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True
        )
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"not JSON-serialisable: {exc}") from None


def normalise_payload(payload: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The payload as it will read back from storage, and its canonical text."""
    return normalise_frozen(freeze_payload(payload))


def freeze_payload(payload: dict[str, Any]) -> str:
    """The payload as JSON text, unsorted: what it holds now, whatever later happens to
    the dict (a writer that holds records a while normalises them later, in a batch)."""
    if not isinstance(payload, dict):
        raise ValueError(f"payload must be a dict, not {type(payload).__name__}")
    try:
        # Not sorted yet: keys of mixed types (1 and "a") cannot be compared
        # before the round trip turns them all into strings.
        return json.dumps(payload, ensure_ascii=True, allow_nan=True, default=_number)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"payload is not JSON-serialisable: {exc}") from None


def normalise_frozen(first: str) -> tuple[dict[str, Any], str]:
    """:func:`normalise_payload` of the payload :func:`freeze_payload` froze."""
    normal = parse_payload(first)
    text = canonical_json(normal)
    if len(text) > MAX_PAYLOAD_CHARS:
        raise ValueError(f"payload is {len(text)} characters, over the limit {MAX_PAYLOAD_CHARS}")
    return normal, text


def _number(value: object) -> int | float:
    """numpy's scalars (registered as numbers) in payloads: the loss is often one."""
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def parse_payload(text: str) -> dict[str, Any]:
    """A stored payload (raises ValueError when it is not a JSON object)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"payload is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("payload is not a JSON object")
    return value


def record_bytes(
    run_id: str,
    stream: int,
    seq: int,
    kind: str,
    step: int | None,
    time: float,
    payload_text: str,
    prev: str,
) -> bytes:
    """The bytes a record's digest is taken over.

    ``payload_text`` is spliced in as is: it must be canonical JSON (what
    :func:`normalise_payload` returns or what :func:`canonical_json` makes of a
    parsed stored payload).
    """
    head = canonical_json(
        {
            "v": FORMAT_VERSION,
            "run_id": run_id,
            "stream": stream,
            "seq": seq,
            "kind": kind,
            "step": step,
            "time": time,
            "prev": prev,
        }
    )
    # "payload" sorts between "kind" and "prev"; splicing keeps the payload's
    # canonical text from being parsed and printed a second time per append.
    marker = ',"prev":'
    cut = head.index(marker)
    return (head[:cut] + ',"payload":' + payload_text + head[cut:]).encode("ascii")


def record_digest(
    run_id: str,
    stream: int,
    seq: int,
    kind: str,
    step: int | None,
    time: float,
    payload_text: str,
    prev: str,
) -> str:
    data = record_bytes(run_id, stream, seq, kind, step, time, payload_text, prev)
    return hashlib.sha256(data).hexdigest()


def check_fields(run_id: str, kind: str, step: int | None, stream: int) -> None:
    """Refuse what a writer should never store (raises ValueError)."""
    if not isinstance(run_id, str) or not run_id or len(run_id) > MAX_RUN_ID_CHARS:
        raise ValueError(f"run_id must be a non-empty string of at most {MAX_RUN_ID_CHARS}")
    if not isinstance(kind, str) or not kind or len(kind) > MAX_KIND_CHARS:
        raise ValueError(f"kind must be a non-empty string of at most {MAX_KIND_CHARS}")
    for name, value in (("stream", stream), ("step", step)):
        if value is None and name == "step":
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an int")
        if not -_INT64 <= value < _INT64:
            raise ValueError(f"{name} does not fit in 64 bits")
    if stream < RUN_STREAM:
        raise ValueError(f"stream must be a rank (>= 0) or {RUN_STREAM} for the run")


def make_record(
    run_id: str,
    stream: int,
    seq: int,
    kind: str,
    step: int | None,
    time: float,
    payload: dict[str, Any],
    payload_text: str,
    prev: str,
) -> Record:
    digest = record_digest(run_id, stream, seq, kind, step, time, payload_text, prev)
    return Record(run_id, stream, seq, kind, step, time, payload, prev, digest)


def is_hex_digest(value: object) -> bool:
    return isinstance(value, str) and _HEX_DIGEST.fullmatch(value) is not None
