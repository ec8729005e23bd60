"""Sealed data on two data-parallel ranks (gloo, CPU): a label changed in one rank's batch
is named with that rank, its step and the sample the DistributedSampler's seed put there;
the other rank replays clean."""

from __future__ import annotations

import random
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

import torch

from tests import data_ddp
from trainguard.data.seal import seal_dataset
from trainguard.explain.replay.ranks import replay_ranks
from trainguard.signing.keys import write_keypair

ROOT = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_rank_that_relabels_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed = secrets.randbelow(2**32)
    rnd = random.Random(seed)
    bad_rank, bad_step = rnd.randrange(2), rnd.randrange(data_ddp.STEPS)
    print(f"seed {seed}: rank {bad_rank} relabels at step {bad_step}")
    (tmp_path / "data").mkdir()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(40, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    torch.save((x[:24], y[:24]), tmp_path / "data" / "a.pt")
    torch.save((x[24:], y[24:]), tmp_path / "data" / "b.pt")
    private, _ = write_keypair(tmp_path / "signer")
    seal_dataset([tmp_path / "data"], private)
    port = _port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.data_ddp",
                str(r),
                "2",
                str(port),
                str(tmp_path),
                str(bad_rank),
                str(bad_step),
            ],
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
    monkeypatch.chdir(ROOT)
    reports = replay_ranks(
        str(tmp_path / "ledger.db"), "run", "tests.data_ddp:build", 2, key=data_ddp.KEY
    )
    bad = reports[bad_rank]
    d = bad.first_divergence
    assert d is not None and d.step == bad_step, (seed, d)
    (finding,) = [f for f in bad.findings() if f.rule != "TG1512"]
    assert finding.rule == "TG1520" and f"rank {bad_rank}" in finding.message, (seed, finding)
    assert "at position 1," in finding.message
    # The other rank's samples are its own and honest: at most its gradients (averaged with
    # the bad rank's) differ from the sabotaged step on, never under a sample rule.
    other = reports[1 - bad_rank]
    first = other.first_divergence
    assert first is None or first.step >= bad_step, (seed, first)
    assert not [f for f in other.findings() if f.rule.startswith("TG152")], seed
