"""verify_ledger against tampering done the way an insider would: SQL on the database.

Each test builds a signed run, edits the tables directly (the append-only
triggers dropped first), and checks that the right rule fires at the right
record, and nothing else.  Runs against SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.test_ledger_support import (
    BACKENDS,
    Row,
    backend_url,
    raw_rows,
    rewrite_stream,
    tamper,
    unsigned_only,
)
from trainguard.findings import Finding, Severity
from trainguard.ledger import LedgerError, open_ledger, verify_ledger
from trainguard.ledger.verify import MAX_FINDINGS_PER_RULE, verify_run
from trainguard.signing.keys import write_keypair

RECORDS = "trainguard_ledger_records"
SET_PAYLOAD = f"UPDATE {RECORDS} SET payload = ? WHERE run_id = ? AND stream = ? AND seq = ?"  # noqa: S608
DELETE = f"DELETE FROM {RECORDS} WHERE run_id = ? AND stream = ? AND seq = ?"  # noqa: S608


@dataclass
class Run:
    url: str
    run_id: str
    private: Path
    public: Path
    other_public: Path

    def verify(self, key: bool = True) -> list[Finding]:
        with closing(open_ledger(self.url, create=False)) as ledger:
            return verify_ledger(ledger, self.run_id, self.public if key else None)

    def append(self, kind: str, payload: dict[str, Any], stream: int, step: int | None) -> None:
        with closing(open_ledger(self.url)) as ledger:
            ledger.append(self.run_id, kind, payload, step=step, stream=stream)


def rules(findings: list[Finding]) -> list[str]:
    return sorted(f.rule for f in findings)


def at(findings: list[Finding], rule: str) -> list[tuple[str, int | None]]:
    return [(f.member, f.offset) for f in findings if f.rule == rule]


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with backend_url(request.param, tmp_path) as u:
        yield u


@pytest.fixture()
def keys(tmp_path: Path) -> tuple[Path, Path, Path]:
    private, public = write_keypair(tmp_path / "signer")
    _, other = write_keypair(tmp_path / "other")
    return private, public, other


@pytest.fixture()
def run(url: str, keys: tuple[Path, Path, Path]) -> Run:
    """Run "r1": rank streams 0 and 1 with 9 steps each, all signed.

    stream -1: run-start (0), run head (1), run head (2)
    streams 0, 1: steps 0-5 (seq 0-5), rank head (6), steps 6-8 (seq 7-9)
    """
    private, public, other = keys
    with closing(open_ledger(url)) as ledger:
        ledger.append("r1", "run-start", {"world_size": 2})
        for step in range(9):
            for rank in (0, 1):
                payload = {"loss": 2.0 / (step + 1), "grad_norm": 0.5 + rank, "step_time": 0.1}
                ledger.append("r1", "step", payload, step=step, stream=rank)
            if step == 5:
                ledger.sign_head("r1", 0, private)
                ledger.sign_head("r1", 1, private)
                ledger.sign_head("r1", -1, private)
        ledger.sign_head("r1", -1, private)
    return Run(url, "r1", private, public, other)


def test_an_intact_signed_run_verifies(run: Run) -> None:
    assert run.verify() == []
    assert unsigned_only(run.verify(key=False))
    with closing(open_ledger(run.url)) as ledger:
        result = verify_run(ledger, "r1", run.public)
    assert (result.records, result.streams, result.signed_heads) == (23, 3, 4)


def test_an_edited_payload_is_caught_at_its_record(run: Run) -> None:
    tamper(run.url, (SET_PAYLOAD, ('{"grad_norm":0.5,"loss":0.1,"step_time":0.1}', "r1", 0, 3)))
    findings = run.verify()
    assert rules(findings) == ["TG1201"]
    finding = findings[0]
    assert (finding.member, finding.offset, finding.severity) == (
        "run r1 stream 0",
        3,
        Severity.CRITICAL,
    )
    assert "edited" in finding.message
    assert rules(run.verify(key=False)) == ["TG1201", "TG1210"]


def test_an_edit_with_its_digest_recomputed_breaks_the_next_link(run: Run) -> None:
    rows = raw_rows(run.url, "r1", 1)
    from trainguard.ledger.chain import record_digest

    row = rows[2]
    payload = '{"grad_norm":1.5,"loss":9.0,"step_time":0.1}'
    digest = record_digest(
        "r1", 1, 2, row["kind"], row["step"], row["wall_time"], payload, row["prev"]
    )
    tamper(
        run.url,
        (
            f"UPDATE {RECORDS} SET payload = ?, digest = ? "  # noqa: S608
            "WHERE run_id = ? AND stream = ? AND seq = ?",
            (payload, digest, "r1", 1, 2),
        ),
    )
    findings = run.verify()
    assert rules(findings) == ["TG1203"]
    assert at(findings, "TG1203") == [("run r1 stream 1", 3)]


def test_a_deleted_record_is_a_gap(run: Run) -> None:
    tamper(run.url, (DELETE, ("r1", 0, 3)))
    findings = run.verify()
    assert rules(findings) == ["TG1202"]
    assert findings[0].evidence == {"first_missing": "3", "last_missing": "3"}


def test_several_deleted_records_are_one_finding(run: Run) -> None:
    tamper(run.url, *[(DELETE, ("r1", 1, seq)) for seq in (1, 2, 3)])
    findings = run.verify()
    assert rules(findings) == ["TG1202"]
    assert "3 record(s) missing" in findings[0].message


def test_swapped_records_are_reordered(run: Run) -> None:
    move = f"UPDATE {RECORDS} SET seq = ? WHERE run_id = ? AND stream = ? AND seq = ?"  # noqa: S608
    tamper(
        run.url,
        (move, (-100, "r1", 0, 2)),
        (move, (2, "r1", 0, 3)),
        (move, (3, "r1", 0, -100)),
    )
    findings = run.verify()
    assert rules(findings) == ["TG1204", "TG1204"]
    assert at(findings, "TG1204") == [("run r1 stream 0", 2), ("run r1 stream 0", 3)]
    assert {f.evidence["written_as"] for f in findings} == {"2", "3"}


def test_records_cut_off_the_end_are_caught_by_the_run_head(run: Run) -> None:
    tamper(run.url, (DELETE, ("r1", 0, 9)), (DELETE, ("r1", 0, 8)))
    findings = run.verify()
    assert [f.rule for f in findings if f.severity >= Severity.HIGH] == ["TG1205"]
    assert at(findings, "TG1205") == [("run r1 stream 0", 8)]
    assert findings[0].evidence["signed_seq"] == "9"
    # Without a key the claim is not authenticated, but still checked.
    assert rules(run.verify(key=False)) == ["TG1205", "TG1210"]


def test_a_deleted_stream_is_caught_by_the_run_head(run: Run) -> None:
    tamper(
        run.url,
        (f"DELETE FROM {RECORDS} WHERE run_id = ? AND stream = ?", ("r1", 1)),  # noqa: S608
        ("DELETE FROM trainguard_ledger_streams WHERE run_id = ? AND stream = ?", ("r1", 1)),
    )
    findings = run.verify()
    assert rules(findings) == ["TG1205"]
    assert "no records" in findings[0].message


def test_a_deleted_stream_is_caught_by_the_stream_list(url: str) -> None:
    with closing(open_ledger(url)) as ledger:
        ledger.append("r", "step", {}, step=0, stream=0)
        ledger.append("r", "step", {}, step=0, stream=1)
    tamper(url, (f"DELETE FROM {RECORDS} WHERE stream = ?", (1,)))  # noqa: S608
    with closing(open_ledger(url)) as ledger:
        findings = verify_ledger(ledger, "r")
    assert rules(findings) == ["TG1202", "TG1210"]
    assert findings[0].member == "run r stream 1"


def test_a_consistently_rewritten_chain_is_caught_by_its_signed_heads(run: Run) -> None:
    def edit(rows: list[Row]) -> list[Row]:
        rows[3] = {**rows[3], "payload": '{"grad_norm":0.5,"loss":0.01,"step_time":0.1}'}
        return rows

    rewrite_stream(run.url, "r1", 0, edit)
    findings = run.verify()
    assert {f.rule for f in findings if f.severity >= Severity.HIGH} == {"TG1206"}
    # The rank head signed seq 5; the run heads signed seq 6 and 9.
    assert at(findings, "TG1206") == [
        ("run r1 stream 0", 5),
        ("run r1 stream 0", 6),
        ("run r1 stream 0", 9),
    ]


def test_without_signed_heads_a_rewrite_is_invisible_and_said_so(url: str, keys: Any) -> None:
    _, public, _ = keys
    with closing(open_ledger(url)) as ledger:
        for step in range(5):
            ledger.append("r", "step", {"loss": 1.0}, step=step, stream=0)

    def drop_one(rows: list[Row]) -> list[Row]:
        return rows[:2] + rows[3:]

    rewrite_stream(url, "r", 0, drop_one)
    with closing(open_ledger(url)) as ledger:
        # The chain is consistent again: only a signature could tell.
        assert unsigned_only(verify_ledger(ledger, "r"))
        findings = verify_ledger(ledger, "r", public)
    assert rules(findings) == ["TG1209"]
    assert findings[0].severity == Severity.HIGH


def test_heads_signed_by_another_key_do_not_verify(run: Run) -> None:
    with closing(open_ledger(run.url)) as ledger:
        findings = verify_ledger(ledger, "r1", run.other_public)
    assert rules(findings) == ["TG1207"] * 4 + ["TG1209"]
    assert all("does not verify" in f.message for f in findings if f.rule == "TG1207")


def test_a_head_stripped_of_its_signature(url: str, keys: Any) -> None:
    private, public, _ = keys
    with closing(open_ledger(url)) as ledger:
        for step in range(3):
            ledger.append("r", "step", {"loss": 1.0}, step=step, stream=0)
        ledger.sign_head("r", 0, private)

    def strip(rows: list[Row]) -> list[Row]:
        payload = json.loads(rows[-1]["payload"])
        del payload["envelope"]
        rows[-1] = {**rows[-1], "payload": json.dumps(payload, separators=(",", ":"))}
        return rows

    rewrite_stream(url, "r", 0, strip)
    with closing(open_ledger(url)) as ledger:
        findings = verify_ledger(ledger, "r", public)
        assert rules(findings) == ["TG1207", "TG1209"]
        assert rules(verify_ledger(ledger, "r")) == ["TG1207", "TG1210"]


def test_a_head_copied_from_another_run(url: str, keys: Any) -> None:
    private, public, _ = keys
    with closing(open_ledger(url)) as ledger:
        ledger.append("a", "step", {"loss": 1.0}, step=0, stream=0)
        genuine = ledger.sign_head("a", 0, private)
        ledger.append("b", "step", {"loss": 1.0}, step=0, stream=0)

    def graft(rows: list[Row]) -> list[Row]:
        payload = json.dumps(genuine.payload, sort_keys=True, separators=(",", ":"))
        return [*rows, {**rows[0], "kind": "head", "step": None, "payload": payload}]

    rewrite_stream(url, "b", 0, graft)
    with closing(open_ledger(url)) as ledger:
        findings = verify_ledger(ledger, "b", public)
    assert rules(findings) == ["TG1207", "TG1209"]
    assert "copied" in findings[0].message


def test_records_after_the_last_head_are_an_unsigned_tail(run: Run) -> None:
    run.append("step", {"loss": 0.1}, stream=1, step=9)
    run.append("alert", {"rule": "TG1301"}, stream=1, step=9)
    findings = run.verify()
    assert rules(findings) == ["TG1208"]
    assert findings[0].severity == Severity.INFO
    assert (findings[0].offset, findings[0].evidence["unsigned_to"]) == (10, "11")
    assert unsigned_only(run.verify(key=False))


@pytest.mark.parametrize(
    ("stored", "reason"),
    [
        ("{not json", "not valid JSON"),
        ('{"grad_norm": 0.5, "loss": 0.5, "step_time": 0.1}', "canonical"),
        ("[]", "not a JSON object"),
    ],
)
def test_unreadable_payloads_are_modified_records(run: Run, stored: str, reason: str) -> None:
    tamper(run.url, (SET_PAYLOAD, (stored, "r1", 1, 4)))
    findings = run.verify()
    assert rules(findings) == ["TG1201"]
    assert reason in findings[0].message


def test_findings_per_rule_are_capped(url: str) -> None:
    with closing(open_ledger(url)) as ledger:
        for step in range(MAX_FINDINGS_PER_RULE + 10):
            ledger.append("r", "step", {"loss": 1.0}, step=step, stream=0)
    tamper(url, (f"UPDATE {RECORDS} SET payload = ?", ('{"loss":2.0}',)))  # noqa: S608
    with closing(open_ledger(url)) as ledger:
        findings = verify_ledger(ledger, "r")
    assert rules(findings) == ["TG1201"] * (MAX_FINDINGS_PER_RULE + 1) + ["TG1210"]
    assert "10 more" in findings[-1].message


def test_an_unknown_run_is_an_error_not_intact(run: Run) -> None:
    with closing(open_ledger(run.url)) as ledger, pytest.raises(LedgerError, match="no records"):
        verify_ledger(ledger, "no-such-run")


@pytest.mark.parametrize("column", ["seq", "stream", "step", "wall_time"])
def test_key_columns_set_to_text_are_reported_not_crashing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, column: str
) -> None:
    # SQLite columns take any type; PostgreSQL's are typed, so this is SQLite only.
    from trainguard.ledger import store

    monkeypatch.setattr(store, "PAGE_SIZE", 3)
    url = str(tmp_path / "l.db")
    with closing(open_ledger(url)) as ledger:
        for step in range(8):
            ledger.append("r", "step", {"loss": 1.0}, step=step, stream=0)
        ledger.append("r", "step", {"loss": 1.0}, step=0, stream=1)
    tamper(
        url,
        (f"UPDATE {RECORDS} SET {column} = 'x' WHERE stream = 0 AND seq = 2", ()),  # noqa: S608
    )
    with closing(open_ledger(url)) as ledger:
        findings = verify_ledger(ledger, "r")
    assert "TG1201" in rules(findings)
    assert {f.severity for f in findings if f.rule != "TG1210"} == {Severity.CRITICAL}
