"""A script that never calls guard.close(): the run still ends in the ledger.

Signed-by-default ledgers fail `ledger verify` without a run-end and final signed
heads (TG1211/TG1212), so the guard closes itself when the interpreter exits; a
process killed without exiting (os._exit) gets no end, and verify says so.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

SCRIPT = """
import os, sys, torch, trainguard
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
guard = trainguard.watch(model, opt, ledger=sys.argv[1], run_id="r", hang_seconds=None)
for _ in range(3):
    x = torch.randn(8, 4)
    loss = model(x).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    guard.step(loss=loss, batch=x)
if sys.argv[2] == "kill":
    os._exit(0)
"""


def _verify(ledger: Path) -> int:
    cmd = [sys.executable, "-m", "trainguard", "ledger", "verify", "r", "--ledger", str(ledger)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120).returncode


@pytest.mark.parametrize(("ending", "verdict"), [("exit", 0), ("kill", 1)])
def test_a_script_left_open_is_closed_at_exit(tmp_path: Path, ending: str, verdict: int) -> None:
    ledger = tmp_path / "l.sqlite"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ledger), ending],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert _verify(ledger) == verdict
