"""DDP gradient accumulation that begins mid-run (``no_sync()`` first used after the
settings check's warm-up) is honest; a step whose last micro-step also ran under
``no_sync()`` (its gradients never averaged across ranks) is TG1318 at that step.
A real DistributedDataParallel of world size 1, in a fresh process (tests/nosync_worker.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.seeds import seeded

WORKER = Path(__file__).with_name("nosync_worker.py")


def _run(seed: int, mode: str, tmp_path: Path) -> dict[str, object]:
    store = tmp_path / f"store-{mode}"
    out = subprocess.run(
        [sys.executable, str(WORKER), str(seed), mode, str(store)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("mode", ["honest", "unsynced"])
def test_no_sync_begun_mid_run(mode: str, tmp_path: Path) -> None:
    seed = seeded().randrange(2**31)
    found = _run(seed, mode, tmp_path)
    print(found)
    alerts = found["alerts"]
    assert isinstance(alerts, list)
    if mode == "honest":
        assert alerts == []
    else:
        assert [(a[0], a[1]) for a in alerts] == [("TG1318", found["bad"])]
        assert "require_backward_grad_sync=False" in alerts[0][3]
