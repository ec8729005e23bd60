"""``trainguard demo`` (what `make demo` runs) plays every act and each catches its plant.

The demo's verdicts are computed from the tools' own outputs, so this test
checks both that the README's example stays true and that the pillars work
together: scan, protect, env verify, watch, replay, diff and report.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")


def test_demo_plays_the_incident_end_to_end(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "trainguard", "demo", "--keep", str(work)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
    assert "7/7 acts caught what was planted" in out
    assert "=> flagged " in out and " 0/" in out.split("=> flagged ", 1)[1].splitlines()[0]
    assert "UnsafeModelError" in out and not (work / "canary-protect").exists()
    assert "TG615" in out and "clusteropt/clip.py" in out
    assert "step  25  critical TG1304" in out and "step  42  critical TG1301" in out
    assert "DIVERGED at step 25" in out
    assert "model.3.weight  changed" in out
    html = (work / "report.html").read_text(encoding="utf-8")
    assert "start here: the first alert is at step 25" in html
    # Nothing the demo planted ever ran.
    assert not list(work.glob("canary*"))
