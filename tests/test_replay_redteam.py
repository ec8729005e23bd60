"""Red-team findings on replay and verify-run (/work/tmp/redteam_replay/REPORT.md), each a
generated test: the class it names stays closed whatever step or position the attack picks.

- A01: a step record the process never wrote is never "matched" (nor is a withheld tail).
- A18: several checkpoints recorded at one position are all checked; ``--to FILE`` checks
  that file.
- A08: conditions the run reports itself never silence a divergence in verify-run: an
  alert is written and the exit code is non-zero.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from tests.seeds import seeded  # noqa: E402
from tests.test_replay import (  # noqa: E402
    EVERY,
    KEY,
    STEPS,
    build,
    build_deterministic,
    parts,
)
from trainguard.explain.replay.engine import epochs_from, replay  # noqa: E402

Hook = Callable[[int, Any, Any], None]


def train(folder: Path, hook: Hook | None = None) -> str:
    """tests/test_replay.py's run; ``hook(s, guard, model)`` after each guard.step, before
    the periodic checkpoint."""
    ledger = str(folder / "ledger.db")
    model, opt, sched, loader, epoch, step = parts()
    guard = trainguard.watch(model, opt, ledger=ledger, run_id="run", scheduler=sched,
                             key=KEY, dataloader=loader)  # fmt: skip
    guard.checkpoint(folder / "run-0.pt", data_state={"epoch": 0})
    batches = epochs_from(0, len(loader), epoch)
    for s in range(STEPS):
        batch = next(batches)
        guard.step(loss=step(batch), batch=batch)
        if hook is not None:
            hook(s, guard, model)
        if (s + 1) % EVERY == 0:
            guard.checkpoint(folder / f"run-{s + 1}.pt", data_state={"epoch": s // 12})
    guard.close()
    return ledger


@pytest.fixture(autouse=True)
def _threads() -> Any:
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


# REPORT.md A01: "a dropped step record ends its segment as matched"
@pytest.mark.parametrize("edit", [True, False], ids=["edited", "dropped-only"])
def test_a_withheld_step_record_is_never_matched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, edit: bool
) -> None:
    from trainguard.monitor.recorder import Recorder

    rnd = seeded()
    bad = rnd.randrange(1, STEPS)  # the last step too: a withheld tail
    print("step", bad, "edit", edit)
    real = Recorder.append

    def append(self: Any, kind: str, payload: Any, step: int) -> None:
        if kind == "step" and step == bad:
            return  # the record of the sabotaged step is never written
        real(self, kind, payload, step)

    monkeypatch.setattr(Recorder, "append", append)

    def hook(s: int, guard: Any, model: Any) -> None:
        if edit and s == bad - 1:
            with torch.no_grad():
                model[0].weight.add_(0.05)

    ledger = train(tmp_path, hook)
    monkeypatch.setattr(Recorder, "append", real)
    report = replay(ledger, "run", build, key=KEY, all_segments=True)
    assert report.exit_code() == 1, report.segments
    if report.verdict == "ledger-unverified":  # the ledger's own step order shows the gap
        assert any(rule.startswith("TG12") for rule, _ in report.ledger_problems)
    else:
        d = report.first_divergence
        assert report.verdict == "diverged" and d is not None and d.step <= bad
        _names_the_gap(report.segments, bad, edit)
    # verify-run replays from the history it read (no whole-ledger check first): the
    # recomputation itself must not call the segment holding the gap matched.
    summary = _verify_run(ledger, tmp_path, build)
    verdicts = summary.verdicts
    holding = [v for v in verdicts if v.start <= bad < v.end or (edit and v.end == bad)]
    assert all(v.status != "matched" for v in holding), verdicts
    assert summary.exit_code() != 0, summary  # a segment it never judged is no pass either
    if not edit and holding:
        assert any(v.step == bad and "record" in v.fields for v in holding), holding


def _names_the_gap(segments: Any, bad: int, edit: bool) -> None:
    missing = [s.divergence for s in segments if s.divergence is not None]
    # Dropped only: the missing record itself is named. Edited too: the edit may be named
    # first (at a checkpoint saved right after it), which ends that segment.
    if not edit:
        assert any(x.step == bad and x.field("record") is not None for x in missing), missing


def _verify_run(ledger: str, folder: Path, entry: Any) -> Any:
    from trainguard.explain.verifier.follow import Verifier
    from trainguard.explain.verifier.sampling import secret_from
    from trainguard.signing.keys import write_keypair

    private, _ = write_keypair(folder / "verifier")
    verifier = Verifier(
        ledger,
        "run",
        entry,
        signing_key=str(private),
        secret=secret_from(private.read_bytes()),
        rate=1.0,
        run_key=KEY,
    )
    try:
        verifier.poll()
    finally:
        verifier.close()
    return verifier.summary


# REPORT.md A18: "several checkpoints recorded at one step: only the last is checked"
def test_every_checkpoint_at_a_position_is_checked(tmp_path: Path) -> None:
    rnd = seeded()
    at = rnd.choice([EVERY, 2 * EVERY, STEPS])  # 10, 20 or the run's end
    bias = rnd.randrange(0, 16)
    print("release checkpoint at", at, "bias", bias)
    release = tmp_path / "release.pt"

    def hook(s: int, guard: Any, model: Any) -> None:
        if s + 1 == at:  # a doctored "release" file, recorded with true digests, then undone
            with torch.no_grad():
                saved = model[0].bias[bias].item()
                model[0].bias[bias] = 0.0
                guard.checkpoint(release, data_state={"epoch": s // 12})
                model[0].bias[bias] = saved

    ledger = train(tmp_path, hook)
    report = replay(ledger, "run", build, key=KEY, all_segments=True)
    named = [s for s in report.segments if s.divergence is not None]
    assert report.verdict == "diverged", report.segments
    assert [s.checkpoint for s in named] == ["release.pt"], named
    assert named[0].divergence is not None and named[0].divergence.kind == "checkpoint"
    assert "TG1511" in {f.rule for f in report.findings()}
    # --to the release file checks that file (the position it names holds two).
    report = replay(ledger, "run", build, key=KEY, stop=str(release), all_segments=True)
    assert report.verdict == "diverged"
    assert any(s.checkpoint == "release.pt" and s.divergence for s in report.segments)


# REPORT.md A08: "self-reported conditions turn a divergence into not comparable, no alert"
def test_a_divergence_under_other_conditions_is_an_alert_in_verify_run(tmp_path: Path) -> None:
    from trainguard.explain.verifier.follow import Verifier
    from trainguard.explain.verifier.sampling import secret_from
    from trainguard.signing.keys import write_keypair

    rnd = seeded()
    bad = rnd.randrange(1, STEPS - 1)
    print("weights nudged after step", bad)

    def hook(s: int, guard: Any, model: Any) -> None:
        if s == bad:
            with torch.no_grad():
                w = model[3].weight.view(-1)
                w[0] = torch.nextafter(w[0], torch.tensor(10.0))

    ledger = train(tmp_path, hook)
    private, _ = write_keypair(tmp_path / "verifier")
    # The entry flips a hold-equal condition: the divergence is "not comparable".
    verifier = Verifier(
        ledger,
        "run",
        build_deterministic,
        signing_key=str(private),
        secret=secret_from(private.read_bytes()),
        rate=1.0,
        run_key=KEY,
    )
    try:
        verifier.poll()
    finally:
        verifier.close()
    summary = verifier.summary
    statuses = [v.status for v in summary.verdicts]
    assert "not-comparable" in statuses, statuses
    assert summary.alerts and all(a["rule"] == "TG1510" for a in summary.alerts)
    assert "conditions" in summary.alerts[0]["message"]
    assert summary.exit_code() == 1
