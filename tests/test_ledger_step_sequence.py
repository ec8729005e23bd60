"""Step records dropped, repeated or renumbered before they are chained fail verify.

A chain is hashed over whatever records it is given: budget mode holds step records in
memory and writes them in batches (monitor/recorder.py), so code in the training
process can edit that list before the records are chained and signed, and the chain
and its signed heads then vouch for a history with steps missing (red team 2, budget
_held_records).  A guard writes exactly one step record per step, in order, from 0, and
its run-end counts them: `ledger verify` holds every rank stream to that (TG1215).

Generated: a budget-mode run of random length whose held records get a random edit
(drop a random stretch, repeat one, renumber one, drop the tail before the run-end)
must fail `trainguard ledger verify` with TG1215; the same run untouched verifies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

from trainguard.cli.main import main  # noqa: E402
from trainguard.monitor import watch  # noqa: E402

EDITS = ("drop", "repeat", "renumber", "drop-tail")


def _verify(url: str, tmp: Path) -> tuple[int, set[str]]:
    out = tmp / "verify.json"
    code = main(["ledger", "verify", "run", "--ledger", url, "-f", "json", "-o", str(out)])
    document: dict[str, Any] = json.loads(out.read_text())
    rules = {f["rule"] for f in document.get("findings", [])}
    return code, rules


def _train(url: str, steps: int, edit: str | None, rng: Any) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, opt, ledger=url, run_id="run", budget=0.05, hang_seconds=None)
    at = rng.randrange(steps - 4)
    for step in range(steps):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        guard.step(loss=loss)
        held = guard.recorder._held
        steps_held = [r[1] for r in held]
        if edit is None or at not in steps_held:
            continue
        i = steps_held.index(at)
        if edit == "drop":
            del held[i : i + rng.randint(1, 3)]
        elif edit == "repeat":
            held.insert(i, held[i])
        elif edit == "renumber":
            kind, s, wall, payload = held[i]
            held[i] = (kind, s + rng.randint(1, 3), wall, payload)
        elif edit == "drop-tail" and step == steps - 1:
            del held[i:]
        else:
            continue
        edit = None  # one edit per run
    guard.close()


def test_held_step_records_edited_before_chaining_fail_verify(tmp_path: Path) -> None:
    rng = seeded()
    steps = rng.randint(12, 30)
    honest = f"sqlite:///{tmp_path / 'honest.sqlite'}"
    _train(honest, steps, None, rng)
    code, rules = _verify(honest, tmp_path)
    assert code == 0 and "TG1215" not in rules, rules
    for edit in EDITS:
        url = f"sqlite:///{tmp_path / (edit + '.sqlite')}"
        _train(url, steps, edit, rng)
        code, rules = _verify(url, tmp_path)
        assert code == 1 and "TG1215" in rules, (edit, rules)


def test_a_step_interrupted_after_its_record_still_verifies(tmp_path: Path) -> None:
    """Red team 3 F4: a step interrupted after its record was written and before the
    guard counted it (Ctrl-C, a peer's timeout in the rank comparison) closes with the
    count before it: one record more than the run-end counts is honest, not TG1215."""
    rng = seeded()
    steps = rng.randint(8, 20)
    at = rng.randrange(2, steps - 1)
    url = f"sqlite:///{tmp_path / 'interrupted.sqlite'}"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, opt, ledger=url, run_id="run", hang_seconds=None)
    done = guard.recorder.step_done

    def interrupted(step: int) -> None:
        if step == at:
            raise KeyboardInterrupt
        done(step)

    with pytest.raises(KeyboardInterrupt), guard:
        guard.recorder.step_done = interrupted  # type: ignore[method-assign]
        for _ in range(steps):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss)
    _, rules = _verify(url, tmp_path)
    assert "TG1215" not in rules, rules
