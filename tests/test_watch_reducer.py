"""DistributedDataParallel's reducer is training machinery: a comm hook registered mid-run
(red team 2 #4: one that keeps 10% of each bucket, or returns the local gradient unaveraged),
a built-in hook, or a bucket setting changed is TG1304 high at the step it changed, in exact
and budget mode; the script's own hook registered before ``watch()`` is reported at start-up;
torch's own all-reduce hook and accumulation under ``no_sync()`` stay quiet.  A hook set on
the C++ reducer directly leaves no Python trace: the gradients it writes are not the mean of
the ranks' local gradients (checks/averaged.py).  A real DDP of
world size 1, in a fresh process (tests/reducer_worker.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.seeds import seeded
from trainguard.findings import Severity

WORKER = Path(__file__).with_name("reducer_worker.py")


def test_reducer_changes_are_named(tmp_path: Path) -> None:
    seed = seeded().randrange(2**31)
    out = subprocess.run(
        [sys.executable, str(WORKER), str(seed), str(tmp_path / "store")],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    honest, changed, before = (json.loads(x) for x in out.stdout.strip().splitlines()[-3:])
    print(honest, changed, before, sep="\n")
    assert honest["mode"] == "honest" and honest["alerts"] == []
    high = [a for a in changed["alerts"] if a[2] >= Severity.HIGH]
    # A public setting is also a module setting changed outside forward (TG1318); a hook
    # that changes the values is also named at each later step (checks/averaged.py).
    at, what = changed["at"], changed["what"]
    assert min(a[1] for a in high) == at, what
    first = [a[3] for a in high if a[1] == at and a[0] == "TG1304"]
    if what == "c++ hook":  # no Python trace: only the values show
        assert any("not the mean of every rank's" in m for m in first), what
    else:
        assert any("reducer changed at run time" in m for m in first), what
    # Planted before watch(): named at step 0 (what it did to the gradients may be named
    # there too, TG1306: not one multiple of what backward left).
    first = [a for a in before["alerts"] if a[2] >= Severity.HIGH]
    assert {a[1] for a in first} == {0}, first
    assert any(a[0] == "TG1304" and "comm hook(s) from" in a[3] for a in first), first
