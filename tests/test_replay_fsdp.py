"""``trainguard replay --all-ranks`` of a 2-rank FSDP2 run (``fully_shard``, gloo, CPU).

One forked launch trains an honest run, one where a rank negates its labels from a step on
and one where a rank edits its slice of the weights after a step (ranks and steps drawn
from a fresh seed, printed; tests/replay_fsdp.py); every rank saves its own slice of the
weights and optimizer state through ``guard.checkpoint``. The honest run replays as
matched on both ranks, from each rank's own checkpoints; the poisoned one is named with
its rank and step, by ``replay --all-ranks`` and by the verifier's rank pool; the tampered
one with its rank alone (the other rank's loss differs too: its forward all-gathers the
edited slice); a checkpoint holding another rank's slices is refused, naming the tensor
and both slices.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("torch")

from tests.seeds import seeded
from trainguard.explain.replay.ranks import replay_ranks, sources

ROOT = Path(__file__).resolve().parents[1]
KEY = bytes(range(32))
ENTRY = "tests.replay_fsdp:build"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Runs:
    folder: Path
    rank: int  # the rank that poisons its labels ...
    step: int  # ... from this step on
    tampered: tuple[int, int]  # the rank that edits its weights' slice after this step

    @property
    def ledger(self) -> str:
        return str(self.folder / "ledger.db")


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    rng = seeded()
    rank, step = rng.randrange(2), rng.randrange(12)
    tampered = (rng.randrange(2), rng.randrange(12))
    print(f"rank {rank} poisons its labels from step {step}; {tampered} tampers")
    folder = tmp_path_factory.mktemp("fsdp-replay")
    argv = ["2", str(_port()), str(folder), "honest:honest", f"poisoned:poison:{rank}:{step}",
            "tampered:tamper:{}:{}".format(*tampered)]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "tests.replay_fsdp", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    codes = json.loads((folder / "exit.json").read_text())
    assert proc.returncode == 0 and codes == {"0": 0, "1": 0}, proc.stderr[-3000:]
    return Runs(folder, rank, step, tampered)


def _statuses(step: int) -> list[str]:
    """Segments 0..6, 6..12 and the end checkpoint: matched before the bad one, none after."""
    bad = step // 6
    return ["matched"] * bad + ["diverged"] + ["skipped"] * (2 - bad)


def test_honest_fsdp_run_matches_on_both_ranks(
    fsdp_runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    reports = replay_ranks(fsdp_runs.ledger, "honest", ENTRY, 2, key=KEY)
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
    fsdp_runs: Runs, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from trainguard.cli.main import main

    monkeypatch.chdir(ROOT)
    key_file = fsdp_runs.folder / "run.key"
    key_file.write_text(KEY.hex())
    argv = ["replay", "poisoned", "--ledger", fsdp_runs.ledger, "--entry", ENTRY,
            "--all-ranks", "--key-file", str(key_file), "--format", "json", "-q"]  # fmt: skip
    assert main(argv) == 1
    out = json.loads(capsys.readouterr().out)
    rank, step = fsdp_runs.rank, fsdp_runs.step
    assert out["first_divergence"] == {"step": step, "ranks": [rank]}
    for r in out["ranks"]:
        assert [s["status"] for s in r["segments"]] == _statuses(step), r["segments"]
        assert r["first_divergence"]["step"] == step  # every rank: the all-reduce spreads it
    own = {f["field"]: f for f in out["ranks"][rank]["first_divergence"]["fields"]}
    spread = {f["field"]: f for f in out["ranks"][1 - rank]["first_divergence"]["fields"]}
    assert "loss" in own and "loss" not in spread, (own, spread)
    # Named by the slices each rank holds: rank 0 rows 0..6 of the first layer, rank 1 7..12.
    rows = {0: "0.weight[0:7]", 1: "0.weight[7:13]"}
    assert rows[rank] in own["after"]["tensors"], own["after"]
    assert rows[1 - rank] in spread["after"]["tensors"], spread["after"]


def test_rank_editing_its_slice_is_named_alone(
    fsdp_runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    rank, after = fsdp_runs.tampered
    reports = replay_ranks(fsdp_runs.ledger, "tampered", ENTRY, 2, key=KEY)
    # Seen at the next step, or in the checkpoint saved right after the edit (steps 6, 12).
    assert sources(reports) == (after + 1, [rank]), [r.first_divergence for r in reports]
    own = reports[rank].first_divergence
    assert own is not None
    field = own.field("before" if own.kind == "step" else "params")
    assert field is not None and field.tensors == (("0.weight[0:7]", "0.weight[7:13]")[rank],)
    bad = (after + 1) // 6
    assert reports[rank].segments[bad].status == "diverged"
    peer = reports[1 - rank].segments[bad]
    if own.kind == "step":  # the peer's forward read the edited slice: it diverged, later fields
        assert peer.status == "diverged" and peer.divergence is not None
        assert peer.divergence.step == after + 1 and peer.divergence.field("before") is None
    else:  # a checkpoint that fails on one rank: no rank replays that segment
        assert peer.status == "skipped", peer


def test_verifier_pool_recomputes_a_sharded_run(
    fsdp_runs: Runs, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainguard.explain.verifier.follow import Verifier
    from trainguard.explain.verifier.sampling import secret_from
    from trainguard.signing.keys import write_keypair

    monkeypatch.chdir(ROOT)
    private, _ = write_keypair(fsdp_runs.folder / "verifier")
    verifier = Verifier(
        fsdp_runs.ledger, "poisoned", ENTRY, signing_key=str(private),
        secret=secret_from(private.read_bytes()), rate=1.0, run_key=KEY,
    )  # fmt: skip
    try:
        verdicts = verifier.poll()
    finally:
        verifier.close()
    rank, step = fsdp_runs.rank, fsdp_runs.step
    bad = step // 6
    # Both segments are sampled (rate 1.0), each recomputed on its own from its checkpoint.
    assert [(v.start, v.end) for v in verdicts] == [(0, 6), (6, 12)]
    assert [v.status for v in verdicts] == ["matched"] * bad + ["diverged"] * (2 - bad)
    assert verdicts[bad].step == step and verdicts[bad].ranks == (rank,), verdicts


def test_checkpoint_sharded_otherwise_is_refused(fsdp_runs: Runs) -> None:
    """Each rank's checkpoint holds only its slices, with where they sit: put into a model
    sharded otherwise (the other rank's slices, no layout, a model without fully_shard),
    it is refused, naming the tensor; never loaded into the wrong rows."""
    for rank in (0, 1):
        tried = json.loads((fsdp_runs.folder / f"restores{rank}.json").read_text())
        assert tried[str(rank)] is None, tried  # its own restores
        peer = tried[str(1 - rank)]
        mine, theirs = ("[0:7]", "[7:13]") if rank == 0 else ("[7:13]", "[0:7]")
        assert peer is not None and peer.startswith("model 0.weight:"), tried
        assert f"slice is {theirs} of shape [13, 8]" in peer and f"holds {mine}" in peer, peer
        assert "holds it whole, the entry's model shards it" in (tried["whole"] or ""), tried
        unsharded = tried["unsharded"] or ""
        assert "holds one rank's slice, the entry's model holds the whole" in unsharded, tried
