"""An optimizer defined in the training script itself, stepped with a closure (SAM).

Two false alarms on honest training this closes: SAM's ``step(closure)`` writes its
perturbation before calling the closure, so the between-steps weight check must run at
the step's entry, not after the closure (TG1301 critical every step); and a script that
defines its optimizer and runs its loop at module level rebinds the loop's globals
every step, so watching the whole ``__main__`` namespace named them as patches
(TG1304 critical).  What the optimizer's code reads is still watched: a global it
reads rebound, a helper it calls replaced, an attribute of a class of the script it reads
changed, or a helper's defaults changed, at a random step, is TG1304 at that step;
code that reads globals by name (``globals()["RHO"]``) has its whole module watched.
The honest run diverges (its loss overflows to NaN): NaN gradients accumulate as NaN,
which the AccumulateGrad check once took for a changed gradient (NaN != NaN).

Each run is a real script (``python script.py``: ``__main__``, module-level loop) in a
subprocess; the kind of sabotage and its step come from a fresh seed (printed).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.seeds import seeded

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
import torch, torch.nn as nn
import trainguard

torch.set_num_threads(1)
torch.manual_seed(0)
RHO = 0.05
SABOTAGE, AT, BUDGET = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) or None


if SABOTAGE == "dynamic":  # reads its global by name: out of the bytecode's sight

    def rho():
        return globals()["RHO"]

else:

    def rho():
        return RHO


class Knobs:
    scale = 1.0


def factor(k=1.0):
    return k


def grad_norm(groups):
    norms = [p.grad.norm(2) for g in groups for p in g["params"] if p.grad is not None]
    return torch.norm(torch.stack(norms), 2)


class SAM(torch.optim.Optimizer):
    def __init__(self, params, base, **kw):
        super().__init__(params, dict(rho=RHO, **kw))
        self.base = base(self.param_groups, **kw)
        self.param_groups = self.base.param_groups

    @torch.no_grad()
    def first_step(self):
        scale = rho() * Knobs.scale * factor() / (grad_norm(self.param_groups) + 1e-12)
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    self.state[p]["old"] = p.data.clone()
                    p.add_(p.grad * scale)

    @torch.no_grad()
    def second_step(self):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old"]
        self.base.step()

    @torch.no_grad()
    def step(self, closure=None):
        closure = torch.enable_grad()(closure)
        self.first_step()
        closure()
        self.second_step()


model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)
guard = trainguard.watch(model, opt, ledger=None, hang_seconds=None, budget=BUDGET)
for step in range(24):
    if step == AT and SABOTAGE in ("global", "dynamic"):
        RHO = -5.0
    elif step == AT and SABOTAGE == "class":
        Knobs.scale = -100.0
    elif step == AT and SABOTAGE == "defaults":
        factor.__defaults__ = (-100.0,)
    elif step == AT and SABOTAGE == "helper":
        grad_norm = lambda groups: torch.tensor(1e-3)
    x = torch.randn(16, 8)
    y = x.sum(1, keepdim=True)

    def closure():
        loss = (model(x) - y).pow(2).mean()
        loss.backward()
        return loss

    opt.zero_grad()
    loss = closure()
    opt.step(closure)
    guard.step(loss=loss, batch=x)
guard.close()
print(json.dumps([[a.rule, a.severity.name, a.step, a.message] for a in guard.alerts]))
"""


def _run(tmp: Path, sabotage: str, at: int, budget: float) -> list[list[object]]:
    script = tmp / "train_sam.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), sabotage, str(at), str(budget)],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("[")]
    return json.loads(lines[-1]) if lines else []


def test_sam_in_the_training_script_is_quiet_and_its_globals_still_watched(
    tmp_path: Path,
) -> None:
    rnd = seeded()
    budget = rnd.choice([0.0, 0.0, 0.05])
    honest = _run(tmp_path, "none", -1, budget)
    assert not [a for a in honest if a[1] in ("HIGH", "CRITICAL")], honest
    sabotage = rnd.choice(["global", "helper", "dynamic", "class", "defaults"])
    at = rnd.randrange(6, 18)
    print(f"budget {budget}, {sabotage} at step {at}")
    alerts = _run(tmp_path, sabotage, at, 0.0)
    named = [a for a in alerts if a[0] == "TG1304" and a[1] == "CRITICAL"]
    if sabotage == "dynamic":
        # The whole module is watched: the loop's own globals are named from the start
        # (the price of reading globals by name), and RHO at its step.
        assert any(a[2] == at and "__main__.RHO" in str(a[3]) for a in named), alerts
    else:
        assert named and min(int(str(a[2])) for a in named) == at, alerts
