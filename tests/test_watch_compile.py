"""torch.compile(optimizer.step) under watch: silent, and what it changes is told from a patch.

Red team 2026-12-04 (/work/tmp/redteam_watch/REPORT.md, "False alarms",
false_alarm_compile.py step): dynamo traced the guard's step hooks into the
compiled step (TG1304 at step 0 for the guard's own modules in
``torch.optim.optimizer``'s globals, then an inductor crash).  The hooks are
left out of compilation (monitor/safety.py), and torch.compile's own changes
to torch's namespaces are accepted by what they are (monitor/compiled.py).
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import trainguard  # noqa: E402
from trainguard.findings import Severity  # noqa: E402
from trainguard.monitor.compiled import dynamo_global  # noqa: E402

F = torch.nn.functional


def _train(model: Any, opt: Any, guard: Any, step: Any, steps: int, tamper_at: int = -1) -> None:
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    for i in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        step()
        guard.step(loss=loss)
        if i == tamper_at:
            with torch.no_grad():
                next(model.parameters()).add_(0.5)


@pytest.mark.parametrize("budget", [None, 0.05])
def test_compiled_step_and_model_are_silent_and_still_watched(budget: float | None) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    guard = trainguard.watch(model, opt, ledger=None, hang_seconds=None, budget=budget)
    compiled = torch.compile(model, backend="eager")
    step = torch.compile(opt.step, backend="eager")
    _train(compiled, opt, guard, step, 6, tamper_at=4)
    guard.close()
    high = [(a.rule, a.step, a.message) for a in guard.alerts if a.severity >= Severity.HIGH]
    assert high and all(r == "TG1301" and s == 5 for r, s, _ in high), high
    assert not any("trainguard" in m for _, _, m in high)


def test_only_what_dynamo_puts_there_passes() -> None:
    """Generative: names with dynamo's prefixes pass only with the value dynamo puts
    there; any other name, or a foreign value, does not."""
    seed = int(os.environ.get("TRAINGUARD_TEST_SEED", random.SystemRandom().randrange(2**32)))
    print(f"seed {seed}")
    rnd = random.Random(seed)
    import builtins

    names = ("torch.optim.optimizer", "torch.nn.functional", "os")
    modules = [m for m in names if m in sys.modules]
    for _ in range(50):
        mod = rnd.choice(modules)
        good = rnd.choice(
            [
                (f"__import_{mod.replace('.', '_dot_')}", sys.modules[mod]),
                (f"__builtins_dict___{rnd.randrange(9)}", builtins.__dict__),
                (f"__compiled_fn_{rnd.randrange(99)}", torch.compiler.disable(lambda: None)),
            ]
        )
        assert dynamo_global(*good)
        name, value = good
        bad = rnd.choice(
            [
                (name.replace("__", "_", 1), value),  # not dynamo's prefix
                (f"__import_{mod.replace('.', '_dot_')}", sys),  # another module than named
                (f"__compiled_fn_{rnd.randrange(99)}", lambda: None),  # not dynamo's wrapper
                (f"__resume_at_{rnd.randrange(99)}", print),
            ]
        )
        assert not dynamo_global(*bad), bad


_MODEL_ONLY = """
import json, sys, torch, trainguard
from trainguard.findings import Severity
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
opt = getattr(torch.optim, sys.argv[1])(model.parameters(), lr=1e-2)
guard = trainguard.watch(model, opt, ledger=None, hang_seconds=None)
fwd = torch.compile(model, backend=sys.argv[2])
x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
for i in range(4):
    loss = torch.nn.functional.cross_entropy(fwd(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    guard.step(loss=loss)
    if i == 1 and sys.argv[3] == "plant":
        # what dynamo does, around another function: not torch's doing
        cls, old = type(opt), type(opt)._init_group
        cls._init_group = torch.compiler.disable(lambda self, *a, **k: old(self, *a, **k))
guard.close()
print(json.dumps([[a.rule, a.step] for a in guard.alerts if a.severity >= Severity.HIGH]))
"""


def test_compiling_only_the_model_is_silent_in_a_fresh_process() -> None:
    """The model compiled after watch(), the optimizer step not (red team 5 h4's honest
    runs): dynamo's first compilation gives each optimizer class its own ``_init_group``,
    the disable wrapper around the one it inherited (AdamW around Adam's): TG1304 critical
    at step 0 before.  A fresh process: in this one dynamo may have patched them already.
    Generated: the optimizer and the backend; a wrapper around another function planted
    the same way after step 1 is still reported (one process: seconds, not a minute)."""
    seed = int(os.environ.get("TRAINGUARD_TEST_SEED", random.SystemRandom().randrange(2**32)))
    rng = random.Random(seed)
    name = rng.choice(["AdamW", "NAdam", "RAdam", "Adam", "SGD"])
    backend = rng.choice(["eager", "aot_eager"])
    import json
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", _MODEL_ONLY, name, backend, "plant"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    print("seed", seed, name, backend, found)
    # Quiet through the compilation and the steps after it; the plant after step 1.
    assert found and all(f == ["TG1304", 2] for f in found), found
