"""The step must give what the optimizer's math gives (TG1306).

Before the step, a keyed sample of elements of each parameter, its gradient
and every optimizer state tensor is read; after it, the parameter at the same
elements must equal what the optimizer's update model predicts from them
(monitor/update_models.py).  A flipped, scaled or skipped update, a learning
rate changed inside the step, or a patched implementation then differs at
most sampled elements, whichever optimizer runs.  The comparison allows for
float rounding: a few units in the last place of the parameter's dtype plus
a relative 1e-3 of the predicted update.
"""

from __future__ import annotations

from typing import Any

from trainguard.findings import Severity
from trainguard.monitor import update_models
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check
from trainguard.monitor.kinds import unreadable
from trainguard.monitor.unread import why

SAMPLES_PER_PARAM = 64
# A step is wrong when this share of all sampled elements misses the prediction.
WRONG_SHARE = 0.25
RELATIVE = 1e-3
ULPS = 8.0


class UpdateModelCheck(Check):
    core = True  # its failure leaves the step unverified: high at once (safety.py)
    unit = "update"  # with StateModelCheck, which reads the samples taken here

    def __init__(self, params: list[tuple[str, Any]], optimizer: Any, key: bytes) -> None:
        import torch

        self.torch = torch
        self.optimizer = optimizer
        self.names = {id(p): n for n, p in params}
        gen = torch.Generator().manual_seed(int.from_bytes(key[16:24], "little") & (2**62))
        self.index = {
            id(p): torch.randint(0, p.numel(), (min(SAMPLES_PER_PARAM, p.numel()),), generator=gen)
            for _, p in params
            if p.numel() and _plain(p, torch)
        }
        self._before: list[tuple[Any, dict[str, Any], update_models.Sample]] = []
        # Parameters whose sample could not be read at this step, and why: one that raises
        # (a tensor subclass in its state) leaves its update unverified, never the others'.
        self.unread: dict[str, str] = {}
        self.ratio: float | None = None  # actual over predicted update, on the last step

    def before_step(self, ctx: Context) -> list[Alert]:
        self._before, self.unread = [], {}
        model = update_models.model_for(self.optimizer)
        if model is None:
            return []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                idx = self.index.get(id(p))
                if idx is None or p.grad is None or unreadable(p.grad) is not None:
                    continue  # a sparse gradient: the gradient probe names it (TG1315)
                try:
                    self._before.append((p, dict(group), self._sample(p, idx)))
                except Exception as e:
                    self.unread[self.names.get(id(p), "?")] = why(e)
        return self._unverified(ctx)

    def _sample(self, p: Any, idx: Any) -> update_models.Sample:
        idx = idx.to(p.device)
        state = {k: self._read(v, idx, p) for k, v in self.optimizer.state.get(p, {}).items()}
        return update_models.Sample(self._read(p, idx, p), self._read(p.grad, idx, p), state)

    def _unverified(self, ctx: Context) -> list[Alert]:
        """The parameters whose update went unverified at this step, reported once."""
        if not self.unread:
            return []
        named, self.unread = self.unread, {}
        return [
            ctx.alert(
                "TG1315",
                f"the update of {len(named)} parameter(s) could not be checked, reading "
                f"them raised: {', '.join(f'{n} ({w})' for n, w in list(named.items())[:3])}",
                severity=Severity.HIGH,
                tensors=sorted(named)[:50],
            )
        ]

    def skipped(self, ctx: Context) -> list[Alert]:
        self._before = []
        return []

    def _read(self, value: Any, idx: Any, p: Any) -> Any:
        torch = self.torch
        if isinstance(value, torch.Tensor):
            if value.dim() == 0 and value is not p and value is not p.grad:
                return float(value.item())  # a step count, NAdam's mu_product
            if value.shape == p.shape and _plain(value, torch):
                return value.detach().reshape(-1)[idx].to(torch.float64).cpu()
            return None
        return float(value) if isinstance(value, (int, float)) else None

    def after_step(self, ctx: Context) -> list[Alert]:
        model = update_models.model_for(self.optimizer)
        if model is None or not self._before:
            return []
        torch = self.torch
        wrong, total, dot, norm = 0, 0, 0.0, 0.0
        tensors = []
        for p, group, sample in self._before:
            try:
                idx = self.index[id(p)].to(p.device)
                after = p.detach().reshape(-1)[idx].to(torch.float64).cpu()
                predicted = model(sample, group)
            except Exception as e:
                self.unread[self.names.get(id(p), "?")] = why(e)
                continue
            ulp = torch.finfo(p.dtype).eps * torch.maximum(sample.param.abs(), after.abs())
            step = predicted - sample.param
            off = (after - predicted).abs() > ULPS * ulp + RELATIVE * step.abs()
            wrong += int(off.sum())
            total += off.numel()
            dot += float(((after - sample.param) * step).sum())
            norm += float((step * step).sum())
            if off.float().mean() > WRONG_SHARE:
                tensors.append(self.names.get(id(p), "?"))
        self._before = []
        self.ratio = dot / norm if norm > 0 else None
        unverified = self._unverified(ctx)
        if not total or wrong <= WRONG_SHARE * total:
            return unverified
        scale = f"{self.ratio:.3g}" if self.ratio is not None else "n/a"
        return [
            *unverified,
            ctx.alert(
                "TG1306",
                f"the update differs from what {type(self.optimizer).__name__}'s math gives at "
                f"{wrong} of {total} sampled elements (update scale {scale} of the expected); "
                f"tensors: {', '.join(tensors[:5])}",
                tensors=tensors[:50],
                scale=self.ratio,
                wrong=wrong,
                sampled=total,
            ),
        ]


def _plain(t: Any, torch: Any) -> bool:
    """A tensor this rank holds whole (not a DTensor shard; those have their own checks)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and unreadable(t) is None
