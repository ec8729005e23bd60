"""Signed heads: a DSSE-signed statement naming the last record of a stream.

A head of a rank's stream signs ``{run_id, stream, seq, digest}`` of that
stream's last record and is appended to the same stream, right after it.  A
head of the run stream (-1) also lists the last record of every other stream
of the run at that moment, so that cutting records off the end of a rank's
stream is caught as long as a later run head survives.  Since the digest of a
record commits to every record before it, one verified head vouches for the
whole chain up to the record it names.

Statements read back from a ledger are untrusted: :func:`parse_statement`
checks every field and raises ValueError with the reason.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from trainguard.ledger.chain import (
    HEAD_PAYLOAD_TYPE,
    HEAD_STATEMENT_TYPE,
    MAX_PAYLOAD_CHARS,
    RUN_STREAM,
    canonical_json,
    is_hex_digest,
)


@dataclass(frozen=True)
class StreamHead:
    stream: int
    seq: int
    digest: str


@dataclass(frozen=True)
class Statement:
    run_id: str
    head: StreamHead
    # Only a run head lists the other streams.
    others: tuple[StreamHead, ...] = ()


def head_payload(statement: Statement, private_key: Any) -> dict[str, Any]:
    """The payload of a ``kind="head"`` record: the envelope and the signer's key id."""
    from trainguard.signing.dsse import sign_envelope
    from trainguard.signing.keys import key_id

    body: dict[str, Any] = {
        "_type": HEAD_STATEMENT_TYPE,
        "run_id": statement.run_id,
        "stream": statement.head.stream,
        "seq": statement.head.seq,
        "digest": statement.head.digest,
    }
    if statement.head.stream == RUN_STREAM:
        body["streams"] = [
            {"stream": h.stream, "seq": h.seq, "digest": h.digest} for h in statement.others
        ]
    data = canonical_json(body).encode("ascii")
    envelope = sign_envelope(data, HEAD_PAYLOAD_TYPE, private_key)
    return {"envelope": envelope, "key_id": key_id(private_key.public_key())}


def unverified_payload(envelope: object) -> bytes:
    """The envelope's payload, not checked against any key (for structure only)."""
    if not isinstance(envelope, dict):
        raise ValueError("the head carries no DSSE envelope")
    if envelope.get("payloadType") != HEAD_PAYLOAD_TYPE:
        raise ValueError("the envelope's payloadType is not a ledger head")
    raw = envelope.get("payload")
    if not isinstance(raw, str) or len(raw) > MAX_PAYLOAD_CHARS:
        raise ValueError("the envelope's payload is missing or too large")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the envelope's payload is not valid base64") from None


def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"the statement's {what} is not an integer")
    return value


def _head(entry: object) -> StreamHead:
    if not isinstance(entry, dict):
        raise ValueError("a stream entry of the statement is not an object")
    digest = entry.get("digest")
    if not is_hex_digest(digest):
        raise ValueError("the statement's digest is not a SHA-256 hex digest")
    assert isinstance(digest, str)
    seq = _int(entry.get("seq"), "seq")
    if seq < 0:
        raise ValueError("the statement's seq is negative")
    return StreamHead(_int(entry.get("stream"), "stream"), seq, digest)


def parse_statement(data: bytes) -> Statement:
    try:
        body = json.loads(data)
    except (ValueError, RecursionError):
        raise ValueError("the signed statement is not valid JSON") from None
    if not isinstance(body, dict) or body.get("_type") != HEAD_STATEMENT_TYPE:
        raise ValueError("the signed statement is not a trainguard ledger head")
    run_id = body.get("run_id")
    if not isinstance(run_id, str):
        raise ValueError("the statement names no run")
    head = _head(body)
    others: tuple[StreamHead, ...] = ()
    if head.stream == RUN_STREAM:
        entries = body.get("streams", [])
        if not isinstance(entries, list):
            raise ValueError("the statement's streams is not a list")
        others = tuple(_head(e) for e in entries)
    return Statement(run_id, head, others)
