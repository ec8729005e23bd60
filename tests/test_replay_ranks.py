"""``trainguard replay`` of a 2-rank data-parallel run: every rank replayed at once under gloo.

An honest run matches on both ranks; a rank that poisons its labels is named with its rank
(the other rank diverges too, after the all-reduce, and is not blamed).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from trainguard.explain.replay.ranks import replay_ranks, sources

ROOT = Path(__file__).resolve().parents[1]
KEY = bytes(range(32))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ddp")
    port = _port()
    jobs = ["honest:honest", "poisoned:poison:1:8"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.replay_ddp", str(r), "2", str(port), str(folder), *jobs],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]
    return folder


def test_honest_two_rank_run_matches(ddp_runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    reports = replay_ranks(str(ddp_runs / "ledger.db"), "honest", "tests.replay_ddp:build", 2,
                           key=KEY)  # fmt: skip
    assert [r.rank for r in reports] == [0, 1]
    for r in reports:
        assert [(s.start, s.end, s.status) for s in r.segments] == [
            (0, 6, "matched"),
            (6, 12, "matched"),
            (12, 12, "matched"),
        ], (r.rank, r.first_divergence)
        assert r.steps == 12
    assert sources(reports) == (None, [])


def test_one_rank_poisoning_its_labels_is_named(
    ddp_runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    reports = replay_ranks(str(ddp_runs / "ledger.db"), "poisoned", "tests.replay_ddp:build", 2,
                           key=KEY)  # fmt: skip
    assert all(r.verdict == "diverged" for r in reports)  # the all-reduce spreads it
    assert sources(reports) == (8, [1])
    d1 = reports[1].first_divergence
    assert d1 is not None and d1.field("loss") is not None
    d0 = reports[0].first_divergence
    assert d0 is not None and d0.step == 8 and d0.field("loss") is None
    # The ranks stopped together, at the first bad segment.
    assert [s.status for s in reports[0].segments] == ["matched", "diverged", "skipped"]


def test_cli_all_ranks(
    ddp_runs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainguard.cli.main import main

    monkeypatch.chdir(ROOT)
    argv = ["replay", "poisoned", "--ledger", str(ddp_runs / "ledger.db"), "--entry",
            "tests.replay_ddp:build", "--all-ranks", "-q"]  # fmt: skip
    assert main(argv) == 1
    assert "the divergence began on rank 1 at 8" in capsys.readouterr().out


def test_verifier_recomputes_a_data_parallel_run(
    ddp_runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verifier's path for world size 2: every rank at once, the rank named."""
    from trainguard.explain.verifier.follow import Verifier
    from trainguard.explain.verifier.pool import RankPool
    from trainguard.explain.verifier.sampling import secret_from
    from trainguard.signing.keys import write_keypair

    monkeypatch.chdir(ROOT)
    pids: list[list[int]] = []
    real_replay = RankPool.replay

    def replay(self: RankPool, options: dict[str, object]) -> list[object]:
        pids.append(self.pids)
        return real_replay(self, options)

    monkeypatch.setattr(RankPool, "replay", replay)
    private, _ = write_keypair(ddp_runs / "verifier")
    verifier = Verifier(
        str(ddp_runs / "ledger.db"),
        "poisoned",
        "tests.replay_ddp:build",
        signing_key=str(private),
        secret=secret_from(private.read_bytes()),
        rate=1.0,
        run_key=KEY,
    )
    try:
        verdicts = verifier.poll()
    finally:
        verifier.close()
    assert [(v.start, v.end, v.status) for v in verdicts] == [
        (0, 6, "matched"),
        (6, 12, "diverged"),
    ]
    assert verdicts[1].step == 8 and verdicts[1].ranks == (1,)
    assert verifier.summary.alerts[0]["evidence"]["ranks"] == [1]
    # Start-up paid once: both segments ran in the same rank processes.
    assert len(pids) == 2 and pids[0] == pids[1] and len(set(pids[0])) == 2


def test_verifier_pool_failure_is_an_error_verdict(
    ddp_runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: rank servers that cannot replay (an entry that builds no Replayable) give an
    error verdict per segment, each from a fresh pool, and leave no process behind."""
    from trainguard.explain.verifier.follow import Verifier
    from trainguard.explain.verifier.pool import RankPool
    from trainguard.explain.verifier.sampling import secret_from
    from trainguard.signing.keys import write_keypair

    monkeypatch.chdir(ROOT)
    pools: list[RankPool] = []
    real_init = RankPool.__init__

    def init(self: RankPool, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        pools.append(self)

    monkeypatch.setattr(RankPool, "__init__", init)
    private, _ = write_keypair(ddp_runs / "verifier-bad")
    verifier = Verifier(
        str(ddp_runs / "ledger.db"), "honest", "tests.replay_ddp:parts",
        signing_key=str(private), secret=secret_from(private.read_bytes()), rate=1.0,
        run_key=KEY,
    )  # fmt: skip
    try:
        verdicts = verifier.poll()
    finally:
        verifier.close()
    assert [v.status for v in verdicts] == ["error", "error"]
    assert all("replaying the ranks failed" in v.cause for v in verdicts), verdicts
    assert len(pools) == 2 and all(p.procs == [] for p in pools)
