"""Does the update follow the gradient?

Two cheap checks, both computed on the tensors' device:

1. Gradient probe: when backward finishes accumulating a parameter's gradient,
   its sum is recorded; at ``optimizer.step`` time the gradient's sum is read
   again.  Clipping and loss-scale unscaling only multiply gradients by a
   positive factor, so the ratio of the two sums must be positive.  A flipped
   clipping (the incident) makes it negative.
2. Update direction on keyed samples: for SGD and Adam/AdamW the direction an
   update must take follows from the gradient and the optimizer's state after
   the step.  A few hundred elements per parameter, at indices chosen from the
   run's secret key, are read before and after the step and compared with that
   direction by cosine similarity.  A flipped update sign gives about -1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SAMPLES_PER_PARAM = 256


@dataclass
class DirectionReport:
    flipped_grads: list[str] = field(default_factory=list)
    cosine: float | None = None


class DirectionCheck:
    def __init__(self, named_params: list[tuple[str, Any]], key: bytes) -> None:
        import torch

        self.torch = torch
        self.params = [(n, p) for n, p in named_params if p.requires_grad]
        gen = torch.Generator().manual_seed(int.from_bytes(key[8:16], "little") & (2**62))
        self.index = {
            id(p): torch.randint(
                0, p.numel(), (min(SAMPLES_PER_PARAM, p.numel()),), generator=gen
            ).to(p.device)
            for _, p in self.params
            if p.numel()
        }
        self.backward_sums: dict[int, Any] = {}
        self.before: dict[int, Any] = {}
        self.grad_at_step: dict[int, Any] = {}
        self.distributed = _distributed()
        self.handles = [p.register_post_accumulate_grad_hook(self._on_grad) for _, p in self.params]

    def _on_grad(self, p: Any) -> None:
        if p.grad is not None:
            # float32 accumulation: only the sign is used, and widening every
            # gradient to float64 costs a slow extra pass.
            self.backward_sums[id(p)] = p.grad.detach().sum()

    def before_step(self) -> list[str]:
        """At optimizer.step entry: sample weights, compare gradient sums. Names flipped ones."""
        torch = self.torch
        self.before.clear()
        self.grad_at_step.clear()
        pairs = []
        names = []
        for name, p in self.params:
            if p.grad is None or not p.numel():
                continue
            idx = self.index[id(p)]
            self.before[id(p)] = p.detach().reshape(-1)[idx].to(torch.float64)
            self.grad_at_step[id(p)] = p.grad.detach().reshape(-1)[idx].to(torch.float64)
            back = self.backward_sums.get(id(p))
            if back is not None:
                pairs.append(torch.stack([back, p.grad.detach().sum()]))
                names.append(name)
        self.backward_sums.clear()
        if not pairs:
            return []
        stacked = torch.stack(pairs)
        if self.distributed:
            # Data-parallel ranks average their gradients after backward: compare
            # with the average of every rank's backward sums, not our own.
            import torch.distributed as dist

            local = stacked[:, 0].contiguous()
            dist.all_reduce(local)
            stacked[:, 0] = local / dist.get_world_size()
        values = stacked.to("cpu").tolist()
        flipped = []
        for name, (back, now) in zip(names, values, strict=True):
            # Relative tolerance: tiny sums carry no sign information.
            if abs(back) > 1e-12 and abs(now) > 1e-12 and back * now < 0:
                flipped.append(name)
        return flipped

    def after_step(self, optimizer: Any) -> float | None:
        """Cosine between the sampled update and the direction the optimizer prescribes."""
        torch = self.torch
        deltas, expected = [], []
        for group in optimizer.param_groups:
            for p in group["params"]:
                before = self.before.get(id(p))
                if before is None:
                    continue
                idx = self.index[id(p)]
                delta = p.detach().reshape(-1)[idx].to(torch.float64) - before
                direction = _prescribed(
                    optimizer, group, p, idx, before, self.grad_at_step[id(p)], torch
                )
                if direction is None:
                    return None  # an optimizer we cannot reason about
                deltas.append(delta)
                expected.append(direction)
        if not deltas:
            return None
        d = torch.cat(deltas)
        e = torch.cat(expected)
        norm = float(d.norm() * e.norm())
        if norm == 0.0 or not math.isfinite(norm):
            return None
        return float((d * e).sum()) / norm

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _distributed() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return bool(dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _prescribed(
    optimizer: Any, group: dict[str, Any], p: Any, idx: Any, before: Any, grad: Any, torch: Any
) -> Any:
    """The update direction (up to a positive factor) the optimizer must take at ``idx``."""
    name = type(optimizer).__name__
    state = optimizer.state.get(p, {})
    sign = 1.0 if group.get("maximize") else -1.0
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    if name == "SGD":
        buf = state.get("momentum_buffer")
        g = grad + wd * before
        if buf is not None and group.get("momentum", 0):
            b = buf.detach().reshape(-1)[idx].to(torch.float64)
            if group.get("nesterov"):
                return sign * (g + float(group["momentum"]) * b)
            return sign * b
        return sign * g
    if name in ("Adam", "AdamW"):
        if "exp_avg" not in state:
            return None
        step = float(state["step"])
        beta1, beta2 = (float(b) for b in group["betas"])
        m = state["exp_avg"].detach().reshape(-1)[idx].to(torch.float64) / (1 - beta1**step)
        v_key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        v = state[v_key].detach().reshape(-1)[idx].to(torch.float64) / (1 - beta2**step)
        u = m / (v.sqrt() + float(group["eps"]))
        decoupled = name == "AdamW" or group.get("decoupled_weight_decay")
        if decoupled and wd:
            u = u + wd * before
        return sign * u
    return None
