"""DDP gradient accumulation that begins mid-run (``no_sync()`` first used after the
settings check's warm-up) is honest; a step whose last micro-step also ran under
``no_sync()`` (its gradients never averaged across ranks) is TG1318 at that step.
A real DistributedDataParallel of world size 1, in a fresh process (tests/nosync_worker.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.seeds import seeded

WORKER = Path(__file__).with_name("nosync_worker.py")


def test_no_sync_begun_mid_run(tmp_path: Path) -> None:
    seed = seeded().randrange(2**31)
    out = subprocess.run(
        [sys.executable, str(WORKER), str(seed), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    honest, unsynced = (json.loads(line) for line in out.stdout.strip().splitlines()[-2:])
    print(honest, unsynced)
    assert honest["mode"] == "honest" and honest["alerts"] == []
    alerts = unsynced["alerts"]
    assert [(a[0], a[1]) for a in alerts] == [("TG1318", unsynced["bad"])]
    assert "require_backward_grad_sync=False" in alerts[0][3]
