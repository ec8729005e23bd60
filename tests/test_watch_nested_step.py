"""A patched ``optimizer.step`` that calls torch's already hooked step inside it.

torch wraps a class's ``step`` with its hook-running wrapper the first time an
optimizer of that class is made (``Optimizer._patch_step_function``).  A patch
installed after that (a late import, a second run in one process) replaces the
class's step with a function calling the hooked one; the next optimizer made
wraps the patch again, so each step runs the guard's hooks twice, nested.  Only
the outer pair brackets the whole step: the inner pair sees the gradients after
the patch changed them.  Found by tests/test_accelerate_fsdp.py (issue 14).

Generated: optimizer class, what the patch does to the gradients (negate, scale,
zero a part), where it acts (before or after calling torch's step) and the step
it arms at; the seed is printed (TRAINGUARD_TEST_SEED replays one).
"""

from __future__ import annotations

import os
import random
import secrets
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from trainguard.monitor.guard import watch  # noqa: E402
from trainguard.rules import RULES  # noqa: E402

HIGH = ("high", "critical")


def _grads(opt: Any, how: str) -> None:
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            if how == "negate":
                p.grad.neg_()
            elif how == "scale":
                p.grad.mul_(-3.0)
            else:  # zero the first half of every gradient, flip the rest
                flat = p.grad.view(-1)
                flat[: flat.numel() // 2] = 0
                flat[flat.numel() // 2 :].neg_()


def _run(tmp_path: Path, rng: random.Random, *, patch: bool) -> tuple[list[Any], int]:
    cls = rng.choice([torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD])
    how = rng.choice(["negate", "scale", "zero-and-flip"])
    at = rng.randrange(3, 8)
    kwargs: dict[str, Any] = {"lr": 1e-2}
    if cls is torch.optim.SGD:
        kwargs["momentum"] = 0.9
    cls([torch.nn.Parameter(torch.zeros(1))], **kwargs)  # the class's step is now hooked
    original = cls.step
    assert getattr(original, "hooked", False)
    calls = [0]

    def step(self: Any, *args: Any, **kw: Any) -> Any:
        armed = patch and calls[0] >= at
        calls[0] += 1
        if armed:
            _grads(self, how)
        return original(self, *args, **kw)

    cls.step = step  # type: ignore[method-assign]
    try:
        torch.manual_seed(rng.randrange(1 << 20))
        model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))
        opt = cls(model.parameters(), **kwargs)
        guard = watch(
            model, opt, ledger=str(tmp_path / f"{patch}.sqlite"), run_id="n", hang_seconds=None
        )
        g = torch.Generator().manual_seed(1)
        for _ in range(at + 3):
            x = torch.randn(8, 7, generator=g)
            loss = ((model(x) - x[:, :3]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            guard.step(loss=loss, batch=x)
        guard.close()
    finally:
        cls.step = original  # type: ignore[method-assign]
    found = [
        a
        for a in guard.alerts
        if str(a.severity or RULES[a.rule].severity) in HIGH and not a.evidence.get("at_start")
    ]
    return found, at


@pytest.mark.parametrize("case", range(3))
def test_a_patch_around_a_hooked_step_is_named_at_its_step(tmp_path: Path, case: int) -> None:
    seed = int(os.environ.get("TRAINGUARD_TEST_SEED") or secrets.randbits(32)) + case
    print(f"TRAINGUARD_TEST_SEED={seed}")
    found, at = _run(tmp_path, random.Random(seed), patch=True)
    assert found and min(a.step for a in found) == at, (seed, found)


def test_an_honest_step_wrapped_twice_is_quiet(tmp_path: Path) -> None:
    seed = int(os.environ.get("TRAINGUARD_TEST_SEED") or secrets.randbits(32))
    print(f"TRAINGUARD_TEST_SEED={seed}")
    found, _ = _run(tmp_path, random.Random(seed), patch=False)
    assert not found, (seed, found)
