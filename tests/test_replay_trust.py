"""Replay checks the ledger it replays: a ledger cut back to an earlier signed head, or with
records deleted and the rest re-hashed, never replays as "matched" for the steps left.

Generated: the run, the cut and the deletion are drawn from a fresh seed (printed).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from tests.seeds import seeded  # noqa: E402
from tests.test_ledger_support import Row, rewrite_stream, tamper  # noqa: E402
from tests.test_replay import KEY, build, train  # noqa: E402
from trainguard.cli.main import main  # noqa: E402
from trainguard.explain.replay.engine import replay  # noqa: E402
from trainguard.explain.replay.result import MATCHED, UNVERIFIED  # noqa: E402
from trainguard.ledger import open_ledger  # noqa: E402
from trainguard.ledger.chain import HEAD_KIND  # noqa: E402

SIGN_EVERY = 4


@pytest.fixture(scope="module")
def honest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("trust")
    train(folder, "run", sign_every=SIGN_EVERY)
    return folder


def _copy(honest: Path, tmp_path: Path) -> str:
    import shutil

    return str(shutil.copy(honest / "ledger.db", tmp_path / "ledger.db"))


def _rows(url: str) -> list[tuple[int, int, str, int | None, float]]:
    lite = sqlite3.connect(url)
    try:
        return lite.execute(
            "SELECT stream, seq, kind, step, wall_time FROM trainguard_ledger_records "
            "WHERE run_id = 'run' ORDER BY wall_time, stream, seq"
        ).fetchall()
    finally:
        lite.close()


# A careful attacker also unregisters a stream it emptied (its registration would show).
UNREGISTER = (
    "DELETE FROM trainguard_ledger_streams WHERE run_id = 'run' AND stream NOT IN "
    "(SELECT stream FROM trainguard_ledger_records WHERE run_id = 'run')",
    (),
)


def cut_back(url: str, rnd: Any) -> str:
    """Everything written after a signed head of stream 0 (picked at random) is deleted, on
    every stream: the ledger a run still running at that head would show."""
    heads = [
        (seq, t)
        for stream, seq, kind, step, t in _rows(url)
        if stream == 0 and kind == HEAD_KIND and seq > 2
    ]
    seq, t = rnd.choice(heads[:-2])  # not the final heads: those are the run's end
    tamper(url, ("DELETE FROM trainguard_ledger_records WHERE run_id = 'run' AND wall_time > ?",
                 (t,)), UNREGISTER)  # fmt: skip
    return f"cut back to stream 0's head at seq {seq}"


def delete_and_rehash(url: str, rnd: Any) -> str:
    """Step records deleted from stream 0 after a random signed head, the heads after them
    and the run's end dropped (nobody can sign them again), the rest re-hashed."""
    rows = _rows(url)
    heads = [seq for stream, seq, kind, _, _ in rows if stream == 0 and kind == HEAD_KIND]
    head = rnd.choice(heads[1:-3])
    steps = [seq for stream, seq, kind, _, _ in rows if stream == 0 and kind == "step"]
    later = [s for s in steps if s > head]
    first = rnd.choice(later[:-2])
    gone = set(rnd.sample([s for s in later if s >= first], rnd.randrange(1, 3)))

    def change(stream_rows: list[Row]) -> list[Row]:
        return [
            r
            for r in stream_rows
            if r["seq"] not in gone
            and not (r["seq"] > head and r["kind"] in (HEAD_KIND, "run-end", "run-summary"))
        ]

    rewrite_stream(url, "run", 0, change)
    tamper(
        url,
        ("DELETE FROM trainguard_ledger_records WHERE run_id = 'run' AND stream = -1", ()),
        UNREGISTER,
    )
    return f"deleted stream 0 seqs {sorted(gone)} after the head at seq {head}, re-hashed"


@pytest.mark.parametrize("attack", [cut_back, delete_and_rehash])
def test_a_cut_or_rehashed_ledger_does_not_replay_as_matched(
    honest: Path, tmp_path: Path, attack: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    rnd = seeded()
    url = _copy(honest, tmp_path)
    print(attack(url, rnd))
    report = replay(url, "run", build, key=KEY, checkpoint_dir=str(honest))
    assert report.verdict == UNVERIFIED and report.exit_code() == 1
    assert report.steps == 0  # a history that does not verify is not replayed
    assert report.ledger_problems and any(r.startswith("TG12") for r, _ in report.ledger_problems)
    assert any(f.rule.startswith("TG12") for f in report.findings())
    capsys.readouterr()
    code = main(["replay", "run", "--ledger", url, "--entry", "tests.test_replay:build",
                 "--checkpoints", str(honest), "-q"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1 and "the ledger does not verify" in out, out
    if attack is cut_back:  # no end: what a run still going shows too, and how to replay it
        assert "--live" in out, out


def test_an_honest_ledger_says_what_matched_covers(honest: Path, tmp_path: Path) -> None:
    url = _copy(honest, tmp_path)
    report = replay(url, "run", build, key=KEY, checkpoint_dir=str(honest))
    assert report.verdict == MATCHED and report.exit_code() == 0
    assert not report.ledger_problems
    assert report.signed_through == 29  # every step's record is under a verified head
    ledger = open_ledger(url, create=False)
    try:
        key_id = next(iter(ledger.records("run", 0))).payload["run_key"]["key_id"]
    finally:
        ledger.close()
    # The run key is pinned: a matching pin verifies, another fails.
    report = replay(url, "run", build, key=KEY, checkpoint_dir=str(honest),
                    expect_key_ids=[key_id[:16]], start=20)  # fmt: skip
    assert report.verdict == MATCHED and "pinned" in report.ledger_check
    report = replay(url, "run", build, key=KEY, checkpoint_dir=str(honest),
                    expect_key_ids=["0" * 16], start=20)  # fmt: skip
    assert report.verdict == UNVERIFIED


def test_a_live_replay_says_what_is_not_signed(honest: Path, tmp_path: Path) -> None:
    """--live: a run that has not ended replays; the steps after the last signed head are
    named as chained but not signed (a cut cannot be told from a run still going)."""
    rnd = seeded()
    url = _copy(honest, tmp_path)
    print(cut_back(url, rnd))
    report = replay(url, "run", build, key=KEY, checkpoint_dir=str(honest), live=True)
    assert report.verdict == MATCHED and "--live" in report.ledger_check
    assert report.signed_through == report.end - 1  # cut at a head: what is left is signed
    assert "signed through step" in report.covered()
