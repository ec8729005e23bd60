"""What replay may trust of the ledger it replays: its chains and signed heads, verified.

A replay that compares recomputed steps with a ledger proves no more than the
ledger does.  Cut a ledger back to an earlier signed head, or delete records
and re-hash the rest, and every step left still replays: "matched" would vouch
for a history someone chose.  So replay verifies the run's ledger first with
:func:`trainguard.ledger.verify.verify_run`, under the rules of ``trainguard
ledger verify`` (heads checked with ``--key``, or with each stream's run key
from its run-start; ``--expect-key-id`` pins those; a signed run must show its
end unless ``live``), and a ledger with a break (a high finding) is not
replayed at all: the verdict says it does not verify.

What a "matched" then covers is stated, not implied: the steps replayed, of
which stream, and up to which step a verified signature covers their records
(:attr:`LedgerCheck.signed_through`); an unsigned run's records are only
consistent, and the check says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trainguard.findings import Severity

MAX_PROBLEMS = 20  # breaks listed in a report (verify caps each rule at 20 already)


@dataclass
class LedgerCheck:
    """The verification of the run's ledger that a replay stands on."""

    problems: list[tuple[str, str]] = field(default_factory=list)  # (rule, message), high+
    description: str = ""  # what was verified, in words (keys, pins, heads)
    signed_through: int | None = None  # the last step of the stream a signature covers
    notes: list[str] = field(default_factory=list)


def check_ledger(
    store: Any,
    run_id: str,
    rank: int,
    seqs: dict[int, int] | None,
    *,
    public_key: Any = None,
    expect_key_ids: list[str] | None = None,
    live: bool = False,
) -> LedgerCheck:
    """Verify ``run_id`` in ``store``; ``seqs`` maps the rank's steps to their records' seqs
    (None: the history could not be read, so no step is said to be covered)."""
    from trainguard.ledger.verify import verify_run

    result = verify_run(store, run_id, public_key, live=live, expect_key_ids=expect_key_ids)
    check = LedgerCheck()
    for f in result.findings:
        if f.severity >= Severity.HIGH and len(check.problems) < MAX_PROBLEMS:
            check.problems.append((f.rule, f"{f.member}: {f.message}"))
    cover = result.covered.get(rank, -1)
    if seqs is not None and not check.problems:
        signed = [step for step, seq in seqs.items() if seq <= cover]
        check.signed_through = max(signed) if signed else None
        last = max(seqs) if seqs else None
        if last is not None and check.signed_through != last:
            after = "no step" if check.signed_through is None else f"step {check.signed_through}"
            check.notes.append(
                f"stream {rank}'s records after {after} are chained but no verified signed "
                "head covers them yet"
                + (
                    " (the run is still running, or its ledger was cut back to its last head: "
                    "--live cannot tell these apart)"
                    if live
                    else ""
                )
            )
    check.description = _describe(result, public_key is not None, expect_key_ids, live)
    return check


def _describe(result: Any, keyed: bool, pinned: list[str] | None, live: bool) -> str:
    ended = "; --live: the run's end was not required" if live else "; the run's end verified"
    if keyed:
        return f"chain and {result.signed_heads} signed head(s) verified with the given key{ended}"
    if not result.run_keys:
        return (
            "UNSIGNED run: the chain is consistent but nothing authenticates it (no run key: "
            "whoever can write the ledger could have rewritten it)"
        )
    how = (
        "pinned with --expect-key-id"
        if pinned
        else "keys taken from the ledger itself; pin them with --expect-key-id"
    )
    return (
        f"chain and {result.signed_heads} signed head(s) verified with the run keys ({how}){ended}"
    )
