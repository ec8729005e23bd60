"""The watchdog on one process: a real hang is reported with where it hangs, an honest run
with jitter and with pauses between steps is not, and on_hang="abort" ends the process.

Hangs here are real: the stalled step naps until the watchdog has reported it (or a
minute has passed, which fails the test), so no test depends on how fast the machine is.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from trainguard.errors import UsageError  # noqa: E402
from trainguard.findings import Severity  # noqa: E402
from trainguard.monitor import guard as tgw  # noqa: E402
from trainguard.monitor import watchdog as wd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def stalled_forward(model: Any, x: Any, released: threading.Event) -> Any:
    """A forward pass that hangs: it naps until the watchdog reported it (at most a minute)."""
    deadline = time.monotonic() + 60
    while not released.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    return model(x)


def _train(guard: tgw.Guard, model: Any, opt: Any, steps: int, between: Any = None) -> None:
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.randn(16, 8, generator=g)
        out = between(step, model, x) if between is not None else model(x)
        loss = ((out - x[:, :1]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.step(loss=loss, batch=x)


def _setup(**kw: Any) -> tuple[tgw.Guard, Any, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return tgw.watch(model, opt, **kw), model, opt


def test_a_real_hang_is_reported_with_the_stack_that_hangs(tmp_path: Path) -> None:
    released = threading.Event()
    ledger = tmp_path / "runs.sqlite"
    guard, model, opt = _setup(
        ledger=ledger,
        run_id="hang",
        hang_seconds=2.0,  # not 0.5: an honest first step at load 10 once took longer
        hang_factor=20,
        on_hang=lambda alert: released.set(),
    )

    def between(step: int, model: Any, x: Any) -> Any:
        return stalled_forward(model, x, released) if step == 30 else model(x)

    _train(guard, model, opt, 40, between)
    guard.close()
    assert released.is_set(), "the watchdog never reported the hang"
    stalls = [a for a in guard.alerts if a.rule == "TG1313"]
    assert [(a.step, a.rank, a.severity) for a in stalls] == [(30, 0, Severity.HIGH)]
    evidence = stalls[0].evidence
    assert evidence["last_step"] == 29
    assert evidence["local_rank"] == 0 and evidence["collective"] is None
    # Innermost frame last: the training thread is inside the function that hangs.
    assert " in stalled_forward" in evidence["stack"][-1]
    assert any(" in _train" in line for line in evidence["stack"])
    assert "after step 29" in stalls[0].message and "stalled_forward" in stalls[0].message
    assert evidence["seconds"] >= evidence["threshold"]  # both rounded to the ms

    from trainguard.cli.main import main
    from trainguard.ledger import open_ledger

    with open_ledger(str(ledger), create=False) as opened:
        records = list(opened.records("hang"))
    stored = [r for r in records if r.kind == "alert" and r.payload["rule"] == "TG1313"]
    assert len(stored) == 1 and stored[0].step == 30
    assert " in stalled_forward" in stored[0].payload["evidence"]["stack"][-1]
    # When the step finally completed, the stall's end was recorded after the alert.
    ends = [r for r in records if r.kind == "stall-end"]
    assert len(ends) == 1 and ends[0].seq > stored[0].seq
    assert ends[0].payload["seconds"] >= evidence["seconds"]
    assert [r.kind for r in records[-2:]] == ["run-end", "head"]  # the final signed head
    assert main(["ledger", "verify", "hang", "--ledger", str(ledger)]) == 0


def test_ledger_show_lists_the_stall(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    released = threading.Event()
    ledger = tmp_path / "runs.sqlite"
    guard, model, opt = _setup(
        ledger=ledger, run_id="shown", hang_seconds=2.0, on_hang=lambda a: released.set()
    )
    _train(
        guard, model, opt, 3, lambda s, m, x: stalled_forward(m, x, released) if s == 1 else m(x)
    )
    guard.close()
    from trainguard.cli.main import main

    assert main(["ledger", "show", "shown", "--ledger", str(ledger)]) == 0
    out = capsys.readouterr().out
    # The alert's line: its rule, its whole message (ledger show never clips it), severity.
    line = next(x for x in out.splitlines() if "step 1 rank 0: rule=TG1313" in x)
    assert "message=rank 0 stalled: no step for" in line and "severity=high" in line
    assert "stall-end" in out
    assert main(["ledger", "show", "shown", "--ledger", str(ledger), "--format", "json"]) == 0
    alerts = json.loads(capsys.readouterr().out)["alerts"]
    assert [a["payload"]["message"].split(";")[0] for a in alerts] == [
        f"rank 0 stalled: no step for {alerts[0]['payload']['evidence']['seconds']:.1f} s "
        "after step 0"
    ]


def test_honest_run_with_jitter_and_pauses_raises_nothing(tmp_path: Path) -> None:
    rng = random.Random(0)
    guard, model, opt = _setup(ledger=tmp_path / "runs.sqlite", hang_seconds=1.0, hang_factor=20)
    assert guard.watchdog is not None
    touched_evaluation_seconds = guard.watchdog.hang_seconds * 2

    def between(step: int, model: Any, x: Any) -> Any:
        time.sleep(rng.uniform(0, 0.004))  # ordinary jitter
        if step == 60:
            # A long evaluation between steps, marked as progress batch by batch.
            end = time.monotonic() + touched_evaluation_seconds
            while time.monotonic() < end:
                with torch.no_grad():
                    model(x)
                guard.watchdog.touch()
                time.sleep(0.05)
        if step == 90:
            with guard.watchdog.paused():  # e.g. saving a large checkpoint
                time.sleep(guard.watchdog.hang_seconds * 2)
        return model(x)

    _train(guard, model, opt, 150, between)
    guard.close()
    assert [a for a in guard.alerts if a.rule == "TG1313"] == []


def test_threshold_follows_the_median_step_time() -> None:
    guard, _, _ = _setup(hang_seconds=1.0, hang_factor=10)
    dog = guard.watchdog
    assert dog is not None
    assert dog.threshold() == 1.0  # no median before enough steps: hang_seconds alone
    window = guard.windows["time"]
    for _ in range(window.warmup):
        window.add(0.5)
    assert dog.threshold() == pytest.approx(5.0)  # 10 x the median step
    guard.close()
    assert not dog._thread.is_alive()


def test_options_are_checked_and_the_watchdog_can_be_off() -> None:
    guard, _, _ = _setup(hang_seconds=None)
    assert guard.watchdog is None
    guard.close()
    for bad in ({"hang_seconds": 0}, {"hang_factor": -1}, {"on_hang": "explode"}):
        with pytest.raises(UsageError):
            _setup(**bad)


ABORT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch
    from trainguard.monitor import guard as tgw

    def stuck_in_data_loading():
        while True:
            time.sleep(0.05)

    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = tgw.watch(model, opt, ledger=sys.argv[1], run_id="abort",
                      hang_seconds=2.0, on_hang="abort")
    for step in range(5):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        guard.step(loss=loss)
    stuck_in_data_loading()
    """
)


def test_on_hang_abort_ends_the_process_after_recording(tmp_path: Path) -> None:
    ledger = tmp_path / "runs.sqlite"
    proc = subprocess.run(
        [sys.executable, "-c", ABORT_SCRIPT, str(ledger)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == wd.HANG_EXIT_CODE, proc.stderr[-2000:]
    assert "stuck_in_data_loading" in proc.stderr  # the thread dump for the person reading logs
    from trainguard.ledger import open_ledger

    with open_ledger(str(ledger), create=False) as opened:
        records = list(opened.records("abort"))
    alerts = [r for r in records if r.kind == "alert"]
    assert [(r.payload["rule"], r.step) for r in alerts] == [("TG1313", 5)]
    assert alerts[0].payload["evidence"]["last_step"] == 4
    assert " in stuck_in_data_loading" in alerts[0].payload["evidence"]["stack"][-1]
    assert records[-1].kind == "alert"  # no run-end: the process was ended
