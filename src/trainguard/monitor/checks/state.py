"""The optimizer's state and the parameter after the step, element by element (TG1306).

``UpdateModelCheck`` compares the parameter with its update model and alerts
when a quarter of the sampled elements miss.  Two attacks stayed under that:
poisoning the state inside the step (the parameter is right this step; the
next steps read the poisoned moments) and flipping the update on a secret 9%
of every tensor.  Both models are exact up to rounding, so this check reads
the same samples (taken before the step by ``UpdateModelCheck``) and, after
the step, compares every state tensor the optimizer keeps with
``state_models`` and the parameter with ``update_models``.  High when more
than a handful of the sampled elements of the parameters, or of the state,
miss (``MAX_SHARE`` of them, and at least ``HANDFUL``), or when one element
misses on ``PERSISTENT`` checks in a row.  ``TENSORS_PER_STEP`` tensors, drawn
with the run's key, are compared per step (the cost is many small operations).  It must run before
``UpdateModelCheck.after_step``, which drops the samples.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from trainguard.findings import Severity
from trainguard.monitor import state_models, update_models
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check
from trainguard.monitor.checks.update import RELATIVE, ULPS, UpdateModelCheck
from trainguard.monitor.unread import why

HANDFUL = 3  # misses on fewer sampled elements than this are rounding, not an attack
MAX_SHARE = 0.01
PERSISTENT = 3  # checks in a row the same element may miss
# Parameter tensors compared per step, drawn with the run's key (each costs ~40 small
# tensor operations; a flip or a poisoned state that matters touches every tensor).
TENSORS_PER_STEP = 4


class StateModelCheck(Check):
    core = True  # its failure leaves the step unverified: high at once (safety.py)
    unit = "update"  # runs at the steps UpdateModelCheck takes its samples

    def __init__(self, update: UpdateModelCheck, key: bytes) -> None:
        self.update = update
        self._streak: dict[tuple[int, str], Any] = {}  # (param id, key) -> misses in a row
        self.compared = 0  # state elements compared so far (the parameter's not counted)
        self._seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")

    def after_step(self, ctx: Context) -> list[Alert]:
        opt = self.update.optimizer
        param_model = update_models.model_for(opt)
        state_model = state_models.model_for(opt)
        if param_model is None or not self.update._before:
            return []
        torch = self.update.torch
        wrong, total, persistent = 0, 0, 0
        counts = {"value": [0, 0], "state": [0, 0]}  # the parameter's and the state's misses
        where: dict[str, int] = {}
        samples = self.update._before
        pick = random.Random(self._seed + ctx.step)  # noqa: S311 - seeded from the run's key
        for p, group, sample in pick.sample(samples, min(TENSORS_PER_STEP, len(samples))):
            try:
                idx = self.update.index[id(p)].to(p.device)
                name = self.update.names.get(id(p), "?")
                expected = {"": param_model(sample, group)}
                if state_model is not None:
                    expected.update(state_model(sample, group))
                state = opt.state.get(p, {})
                for key, want in expected.items():
                    got = self.update._read(p if not key else state.get(key), idx, p)
                    before = sample.param if not key else sample.state.get(key)
                    off = _off(torch, p, want, got, before)
                    if off is None:
                        continue
                    wrong += int(off.sum())
                    total += off.numel()
                    self.compared += off.numel() if key else 0
                    counts["state" if key else "value"][0] += int(off.sum())
                    counts["state" if key else "value"][1] += off.numel()
                    if bool(off.any()):
                        where[f"{name} {key or 'value'}"] = int(off.sum())
                    streak = self._streak.get((id(p), key))
                    streak = off.int() if streak is None else (streak + 1) * off.int()
                    self._streak[(id(p), key)] = streak
                    persistent += int((streak >= PERSISTENT).sum())
            except Exception as e:  # its update unverified (reported by UpdateModelCheck)
                self.update.unread[self.update.names.get(id(p), "?")] = why(e)
        # Judged apart: a flip touches only the parameter, a poisoned moment only state.
        many = any(w >= max(HANDFUL, MAX_SHARE * n) for w, n in counts.values() if n)
        if not total or not (many or persistent):
            return []
        named = sorted(where, key=lambda k: -where[k])
        return [
            ctx.alert(
                "TG1306",
                f"the optimizer's state or update differs from {type(opt).__name__}'s math at "
                f"{wrong} of {total} sampled elements ({persistent} missing on {PERSISTENT}+ "
                f"steps in a row): {', '.join(f'{k} ({where[k]})' for k in named[:5])}",
                severity=Severity.HIGH,
                tensors=named[:50],
                wrong=wrong,
                sampled=total,
                kind="state",
            )
        ]


def _off(torch: Any, p: Any, want: Any, got: Any, before: Any) -> Any:
    """Elements where ``got`` misses ``want`` beyond rounding (None: nothing to compare)."""
    if got is None:
        return None
    if isinstance(want, float) or isinstance(got, float):
        if not isinstance(want, (int, float)) or not isinstance(got, (int, float)):
            return torch.ones(1, dtype=torch.bool)  # a scalar became a tensor, or back
        return torch.tensor([abs(got - want) > 1e-6 * max(1.0, abs(want))])
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return torch.ones(1, dtype=torch.bool)
    scale = torch.maximum(want.abs(), got.abs())
    change = (want - before).abs() if isinstance(before, torch.Tensor) else want.abs()
    return (got - want).abs() > ULPS * torch.finfo(p.dtype).eps * scale + RELATIVE * change
