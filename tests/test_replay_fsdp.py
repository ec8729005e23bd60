"""``trainguard replay --all-ranks`` of a 2-rank FSDP2 run (``fully_shard``, gloo, CPU).

One forked launch trains an honest run and one where rank 1 negates its labels from
step 8 (tests/replay_fsdp.py); every rank saves its own slice of the weights and
optimizer state through ``guard.checkpoint``.  The honest run replays as matched on both
ranks, from each rank's own checkpoints; the poisoned one is named with its rank and
step, by ``replay --all-ranks`` and by the verifier's rank pool; a checkpoint holding
another rank's slices is refused, naming the tensor and both slices.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from trainguard.explain.replay.ranks import replay_ranks, sources

ROOT = Path(__file__).resolve().parents[1]
KEY = bytes(range(32))
ENTRY = "tests.replay_fsdp:build"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fsdp-replay")
    argv = ["2", str(_port()), str(folder), "honest:honest", "poisoned:poison:1:8"]
    proc = subprocess.run(
        [sys.executable, "-m", "tests.replay_fsdp", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    codes = json.loads((folder / "exit.json").read_text())
    assert proc.returncode == 0 and codes == {"0": 0, "1": 0}, proc.stderr[-3000:]
    return folder


def test_honest_fsdp_run_matches_on_both_ranks(
    fsdp_runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    reports = replay_ranks(str(fsdp_runs / "ledger.db"), "honest", ENTRY, 2, key=KEY)
    assert [r.rank for r in reports] == [0, 1]
    for r in reports:
        assert [(s.start, s.end, s.status) for s in r.segments] == [
            (0, 6, "matched"),
            (6, 12, "matched"),
            (12, 12, "matched"),
        ], (r.rank, r.first_divergence, [s.notes for s in r.segments])
        assert r.steps == 12 and r.mode == "keyed"
        # Each rank restored its own checkpoints.
        assert [s.checkpoint for s in r.segments] == [
            f"honest-r{r.rank}-{n}.pt" for n in (0, 6, 12)
        ]
    assert sources(reports) == (None, [])


def test_rank_poisoning_its_labels_is_named_by_replay_all_ranks(
    fsdp_runs: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainguard.cli.main import main

    monkeypatch.chdir(ROOT)
    key_file = fsdp_runs / "run.key"
    key_file.write_text(KEY.hex())
    argv = ["replay", "poisoned", "--ledger", str(fsdp_runs / "ledger.db"), "--entry", ENTRY,
            "--all-ranks", "--key-file", str(key_file), "--format", "json", "-q"]  # fmt: skip
    assert main(argv) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["first_divergence"] == {"step": 8, "ranks": [1]}
    r0, r1 = out["ranks"]
    assert [s["status"] for s in r0["segments"]] == ["matched", "diverged", "skipped"]
    assert [s["status"] for s in r1["segments"]] == ["matched", "diverged", "skipped"]
    own = {f["field"]: f for f in r1["first_divergence"]["fields"]}
    spread = {f["field"]: f for f in r0["first_divergence"]["fields"]}
    assert r1["first_divergence"]["step"] == 8 and "loss" in own
    assert r0["first_divergence"]["step"] == 8 and "loss" not in spread  # after the all-reduce
    # Named by the slices each rank holds: rank 1 the rows 7..12 of the first layer.
    assert "0.weight[7:13]" in own["after"]["tensors"], own["after"]
    assert "0.weight[0:7]" in spread["after"]["tensors"], spread["after"]


def test_verifier_pool_recomputes_a_sharded_run(
    fsdp_runs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainguard.explain.verifier.follow import Verifier
    from trainguard.explain.verifier.sampling import secret_from
    from trainguard.signing.keys import write_keypair

    monkeypatch.chdir(ROOT)
    private, _ = write_keypair(fsdp_runs / "verifier")
    verifier = Verifier(
        str(fsdp_runs / "ledger.db"), "poisoned", ENTRY, signing_key=str(private),
        secret=secret_from(private.read_bytes()), rate=1.0, run_key=KEY,
    )  # fmt: skip
    try:
        verdicts = verifier.poll()
    finally:
        verifier.close()
    assert [(v.start, v.end, v.status) for v in verdicts] == [
        (0, 6, "matched"),
        (6, 12, "diverged"),
    ]
    assert verdicts[1].step == 8 and verdicts[1].ranks == (1,)


def test_checkpoint_of_another_ranks_slices_is_refused(fsdp_runs: Path) -> None:
    """Each rank's checkpoint holds only its slices, with where they sit: put into a model
    sharded otherwise (here: the other rank's), it is refused, naming both slices."""
    for rank in (0, 1):
        tried = json.loads((fsdp_runs / f"restores{rank}.json").read_text())
        assert tried[str(rank)] is None, tried  # its own restores
        peer = tried[str(1 - rank)]
        mine, theirs = ("[0:7]", "[7:13]") if rank == 0 else ("[7:13]", "[0:7]")
        assert peer is not None and peer.startswith("model 0.weight:"), tried
        assert f"slice is {theirs} of shape [13, 8]" in peer and f"holds {mine}" in peer, peer
