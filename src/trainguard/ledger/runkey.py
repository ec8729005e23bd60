"""Run keys: the public half of the key that signs a stream's heads, kept in the ledger.

``watch()`` makes an Ed25519 key per rank at start (or uses the user's own
``sign_key``) and writes its public half into that rank's ``run-start``
record, at seq 0 of its stream.  Every later signed head of the stream covers
that record, so the key cannot be swapped without breaking every head after
it; the private half lives in the training process's memory only (unless the
user asks for a copy), so once the process has exited nobody can sign a new
head, and a rewritten stream cannot be re-signed.

What a key in the ledger cannot prove is that the *first* record is the one
the run wrote: someone who rewrites a stream whole, run-start included, with a
key of their own produces a ledger that is consistent.  That is what
``--expect-key-id`` pins (the key id ``watch`` logs at start).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainguard.ledger.chain import Record
    from trainguard.ledger.interface import Ledger
    from trainguard.signing.keys import PrivateKey, PublicKey

# The run-start payload's field; ``None`` means signing was turned off.
RUN_KEY_FIELD = "run_key"
RUN_START_KIND = "run-start"
RUN_END_KIND = "run-end"
RUN_SUMMARY_KIND = "run-summary"
MAX_PEM_CHARS = 4096  # an Ed25519 or P-384 public key is a few hundred characters
# A key id given on the command line is a prefix of the hex SHA-256; shorter
# ones would be guessable by someone who makes keys until one matches.
MIN_KEY_ID_CHARS = 16


def new_run_key() -> PrivateKey:
    """A fresh Ed25519 key that lives in memory only (signing costs ~50 us)."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519.Ed25519PrivateKey.generate()


def run_key_entry(key: PrivateKey) -> dict[str, Any]:
    """What the run-start record says about the key that signs the stream's heads."""
    from trainguard.signing.keys import key_id, public_pem

    public = key.public_key()
    return {"key_id": key_id(public), "public_pem": public_pem(public).decode("ascii")}


def key_from_entry(entry: object) -> tuple[PublicKey, str]:
    """The public key and key id of a run-start's ``run_key`` (raises ValueError)."""
    from cryptography.hazmat.primitives import serialization

    from trainguard.signing.errors import KeyLoadError
    from trainguard.signing.keys import key_id, public_key_from

    if not isinstance(entry, dict):
        raise ValueError("the run key is not an object")
    pem = entry.get("public_pem")
    if not isinstance(pem, str) or len(pem) > MAX_PEM_CHARS or "PRIVATE" in pem:
        raise ValueError("the run key carries no public PEM")
    try:
        key = public_key_from(serialization.load_pem_public_key(pem.encode("ascii")))
    except (ValueError, UnicodeError, KeyLoadError, TypeError) as exc:
        reason = str(exc) if isinstance(exc, KeyLoadError) else "not a PEM public key"
        raise ValueError(f"the run key cannot be read: {reason}") from None
    ident = key_id(key)
    if entry.get("key_id") != ident:
        raise ValueError("the run key's key_id is not the SHA-256 of its PEM")
    return key, ident


def key_id_matches(ident: str, expected: list[str]) -> bool:
    """Whether ``ident`` is one of the pinned key ids (each a prefix of a hex SHA-256)."""
    return any(ident.startswith(e.lower()) for e in expected)


def check_expected_ids(expected: list[str]) -> list[str]:
    """The problems of key ids given to pin run keys (empty when they are usable)."""
    problems = []
    for e in expected:
        low = e.lower()
        if (
            len(low) < MIN_KEY_ID_CHARS
            or len(low) > 64
            or any(c not in "0123456789abcdef" for c in low)
        ):
            problems.append(
                f"key id {e!r}: expected {MIN_KEY_ID_CHARS} to 64 hex characters "
                "(as watch logged it at start: 'ledger run key id ...')"
            )
    return problems


def key_id_of(key: Any) -> str:
    from trainguard.signing.keys import key_id

    return key_id(key) if key is not None else ""


def first_record(ledger: Ledger, run_id: str) -> Record | None:
    """Stream 0's first record (its run-start), read before the pass that checks it."""
    records = ledger.records(run_id, 0)
    try:
        first = next(iter(records), None)
    finally:
        close = getattr(records, "close", None)
        if callable(close):
            close()
    return first if first is not None and first.seq == 0 and first.stream == 0 else None
