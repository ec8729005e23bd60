"""What may happen to a gradient between backward and ``optimizer.step``.

The gradient probe (monitor/direction.py) reads each parameter's gradient at keyed
sample elements twice: when backward has accumulated it (the post-accumulate hook)
and at the optimizer's pre-hook.  Honest loops change it in between in few ways,
and each has a shape:

* nothing: the two samples are equal;
* ``clip_grad_norm_`` over the optimizer's parameters, ``GradScaler.unscale_``, a loop
  dividing by its accumulation count: every gradient times ONE factor ``c > 0``;
  ``clip_grad_norm_`` then leaves the gradients' total norm at its ``max_norm`` (the
  same value at every clipped step), unscaling multiplies by a power of two that
  changes only as the loss scale grows or backs off, a fixed division by a constant;
* ``clip_grad_value_``: each element clamped to ``[-v, v]`` with one ``v``.

Anything else (a layer zeroed or dropped, ``x0.1`` on every gradient, noise of the
same norm, a partial flip, a tighter ``max_norm``, a gradient that backward left and
is now ``None``, sparse or of another shape) is TG1306 at that step.  A loop that clips
parameter subsets separately declares it: ``watch(..., grad_clipping="per_tensor")``
then allows one factor in ``(0, 1]`` per tensor (and checks no norm).  A loop that
divides by a count that varies per step (torchtune's tokens in the batch) declares
``watch(..., grad_scaling="varying")``: any positive factor, still ONE for every
gradient (a factor per tensor, a flip, a zeroed layer stay TG1306), and no norm rule.

:class:`FactorJudge` holds what the run taught it (the clip norm, the clip value, the
loss scale's exponent, a fixed factor) and judges one step's samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

Clipping = Literal["global", "per_tensor"]
Scaling = Literal["fixed", "varying"]

# Relative error allowed between the two samples once the factor is taken out: one
# rounding of a float32 product is 6e-8; reduced-precision gradients round at 2^-8,
# and data-parallel averages (compressed communication too) come from other sums.
RTOL_EXACT = 1e-4
RTOL_LOW = 2e-2
RTOL_DISTRIBUTED = 5e-2
# The total norm after clip_grad_norm_ is max_norm x T/(T+1e-6), summed in another
# order than the guard's: the same within this.
NORM_RTOL_EXACT = 2e-3
NORM_RTOL_LOW = 3e-2


@dataclass
class Pair:
    """One parameter's gradient samples: at backward's end and at the pre-hook."""

    name: str
    back: Any  # float64 samples
    now: Any  # float64 samples


class FactorJudge:
    """One optimizer's gradient factor across steps (see the module docstring)."""

    def __init__(
        self, clipping: Clipping = "global", *, norm_rule: bool = True, scaling: Scaling = "fixed"
    ) -> None:
        self.clipping = clipping
        self.scaling = scaling
        # The clip norm is the total over the parameters clip_grad_norm_ was given; with
        # several optimizers on one model those are not this optimizer's own.
        self.norm_rule = norm_rule
        self.max_norm: float | None = None  # the total norm clipped steps leave
        self.largest_unclipped = 0.0  # no honest clip norm is below an unclipped total
        self.clip_value: float | None = None  # clip_grad_value_'s v
        self.scale_exponent: int | None = None  # GradScaler: c = 2^k
        self.fixed: float | None = None  # the first step's factor, when it is not 1
        self.steps = 0  # steps whose factor was judged

    def judge(
        self,
        torch: Any,
        pairs: list[Pair],
        rtol: float,
        total_norm: Any,
        local: list[Pair] | None = None,
    ) -> str | None:
        """A message when the pre-hook's gradients are not what an honest loop leaves;
        ``total_norm()`` gives the optimizer's total gradient norm now (a pass over the
        gradients, taken only at a step that needs it).  Distributed: ``pairs`` hold the
        ranks' averaged backward samples (DDP averages), ``local`` this rank's own, used
        instead when they fit (replicas that do not average, as with a GAN per rank)."""
        if not pairs:
            return None
        if local is not None:
            local_stats = _stats(torch, local)
            if self.clipping == "per_tensor":
                if _per_tensor(local, local_stats, rtol) is None:
                    return None
            elif _fits(torch, local, local_stats, rtol):
                pairs = local
        stats = _stats(torch, pairs)
        if self.clipping == "per_tensor":
            return _per_tensor(pairs, stats, rtol)
        bb = sum(s[0] for s in stats)
        bn = sum(s[1] for s in stats)
        if not all(math.isfinite(v) for s in stats for v in s):
            return None  # an overflow the scaler skips; the update checks see the step
        if bb == 0.0:
            grown = [p.name for p, s in zip(pairs, stats, strict=True) if s[2] > 0.0]
            if grown:
                return f"gradients backward left zero are not at optimizer.step: {_names(grown)}"
            return None
        c = bn / bb
        off = _misfit(pairs, stats, c, rtol)
        clamped = False
        if off:
            moved, c = self._clamped(torch, pairs, rtol)
            if moved is not None:
                return moved
            if c == 0.0:
                return (
                    f"the gradients at optimizer.step are not one positive multiple of what "
                    f"backward left (clipping and unscaling scale all alike): "
                    f"{_names(_moved(pairs, stats, rtol) or off)}"
                )
            clamped = True
        if c <= 0.0:
            return f"every gradient was multiplied by {c:.3g} between backward and the step"
        first, self.steps = self.steps == 0, self.steps + 1
        if self.scaling == "varying":
            return None  # declared: any positive factor, one for all (checked above)
        return self._factor(c, rtol, total_norm, first, clamped)

    def _factor(
        self, c: float, rtol: float, total_norm: Any, first: bool, clamped: bool
    ) -> str | None:
        exponent = math.log2(c)
        power = abs(exponent - round(exponent)) < 1e-9
        if abs(c - 1.0) <= rtol:
            plain = True
        elif power and self._scaled(round(exponent), first):
            plain = True  # GradScaler's 1/scale
        else:
            if first:
                self.fixed = c
                # Or a first step both unscaled and clipped (GradScaler, or a division by
                # a power of two, then clip_grad_norm_): its power of two is at most
                # ceil(log2 c), and a later step that only unscales shows the scaler's own
                # (was TG1306 critical at every later unclipped step of such a run).
                self.scale_exponent = math.ceil(exponent)
            # a fixed division (by the accumulation count, a constant scale)
            plain = self.fixed is not None and abs(c - self.fixed) <= rtol * self.fixed
        if plain:
            return None if clamped else self._unclipped(rtol, total_norm)
        if c > 1.0 + rtol:
            return f"every gradient was multiplied by {c:.4g} (> 1) between backward and the step"
        if clamped:
            return f"the gradients were scaled by {c:.4g} before clip_grad_value_ clamped them"
        if not self.norm_rule:
            return None
        return self._clipped(float(total_norm()), c, rtol)

    def _unclipped(self, rtol: float, total_norm: Any) -> str | None:
        """A step clip_grad_norm_ left alone: its total is at most the clip norm, and no
        later clip norm may be below it."""
        if not self.norm_rule:
            return None
        norm = float(total_norm())
        if self.max_norm is not None and norm > self.max_norm * (1 + _norm_rtol(rtol)):
            return (
                f"the gradients' total norm {norm:.4g} was left unclipped; "
                f"the run clipped to {self.max_norm:.4g}"
            )
        self.largest_unclipped = max(self.largest_unclipped, norm)
        return None

    def _scaled(self, exponent: int, first: bool) -> bool:
        """GradScaler: the factor is 1/scale, a power of two that halves when the scale
        grows and doubles (by any power) when an overflowed step was skipped."""
        if first:
            self.scale_exponent = exponent
            return True
        if self.scale_exponent is None:
            return False
        if exponent >= self.scale_exponent - 1:
            self.scale_exponent = exponent
            return True
        return False

    def _clipped(self, norm: float, c: float, rtol: float) -> str | None:
        tol = _norm_rtol(rtol)
        if self.max_norm is None:
            if norm < self.largest_unclipped * (1 - tol):
                return (
                    f"the gradients were scaled by {c:.4g} to a total norm of {norm:.4g}, "
                    f"below the {self.largest_unclipped:.4g} earlier steps kept unclipped"
                )
            self.max_norm = norm
            return None
        if abs(norm - self.max_norm) > tol * self.max_norm:
            return (
                f"the gradients were scaled by {c:.4g} to a total norm of {norm:.4g}; "
                f"the run clipped to {self.max_norm:.4g}"
            )
        return None

    def _clamped(self, torch: Any, pairs: list[Pair], rtol: float) -> tuple[str | None, float]:
        """clip_grad_value_ (after any factor c: unscaling, a fixed division): when the
        samples are ``clamp(c x back, -v, v)``, (a message if v moved, c); (None, 0.0)
        when they are not."""
        v, c = _clamp_fit(torch, pairs, rtol)
        if c <= 0.0:
            return None, 0.0
        if self.clip_value is None:
            self.clip_value = v
        elif abs(v - self.clip_value) > rtol * self.clip_value:
            return (
                f"the gradients were clamped to {v:.4g}; the run clamped to {self.clip_value:.4g}",
                c,
            )
        return None, c


def _stats(torch: Any, pairs: list[Pair]) -> list[list[float]]:
    """Per pair: back.back, back.now, now.now (one transfer for all)."""
    sums = [
        torch.stack([(p.back * p.back).sum(), (p.back * p.now).sum(), (p.now * p.now).sum()])
        for p in pairs
    ]
    return torch.stack(sums).to("cpu").tolist()  # type: ignore[no-any-return]


def _fits(torch: Any, pairs: list[Pair], stats: list[list[float]], rtol: float) -> bool:
    """Whether the samples are one factor of backward's, or a clamp of one (no state)."""
    bb = sum(s[0] for s in stats)
    if bb == 0.0:
        return all(s[2] == 0.0 for s in stats)
    c = sum(s[1] for s in stats) / bb
    return not _misfit(pairs, stats, c, rtol) or _clamp_fit(torch, pairs, rtol)[1] > 0.0


def _clamp_fit(torch: Any, pairs: list[Pair], rtol: float) -> tuple[float, float]:
    """(v, c) when the samples are ``clamp(c x back, -v, v)``; c = 0.0 when they are not."""
    now = torch.cat([p.now for p in pairs])
    back = torch.cat([p.back for p in pairs])
    v = float(now.abs().max())
    if v <= 0.0:
        return v, 0.0
    inside = now.abs() < v * (1 - rtol)  # elements the clamp left alone: c x back
    bb = float((back[inside] * back[inside]).sum())
    c = float((back[inside] * now[inside]).sum()) / bb if bb > 0.0 else 1.0
    expected = (c * back).clamp(-v, v)
    if c <= 0.0 or float((now - expected).norm()) > rtol * float(expected.norm()):
        return v, 0.0
    return v, c


def _misfit(pairs: list[Pair], stats: list[list[float]], c: float, rtol: float) -> list[str]:
    off = []
    for p, (bb, bn, nn) in zip(pairs, stats, strict=True):
        # |now - c back|^2 from the three sums (float64: exact enough for these tolerances)
        residual = max(nn - 2 * c * bn + c * c * bb, 0.0)
        if residual > (rtol * rtol) * (c * c * bb) + 1e-300:
            off.append(p.name)
    return off


def _moved(pairs: list[Pair], stats: list[list[float]], rtol: float) -> list[str]:
    """The tensors that left the factor most tensors share (the median of the per-tensor
    factors): the least-squares factor of all of them is pulled by the one that moved, and
    every tensor then misfits it (a message named all of the optimizer's tensors)."""
    factors = sorted(s[1] / s[0] for s in stats if s[0] > 0.0)
    if not factors:
        return []
    return _misfit(pairs, stats, factors[len(factors) // 2], rtol)


def _per_tensor(pairs: list[Pair], stats: list[list[float]], rtol: float) -> str | None:
    off = []
    for p, (bb, bn, nn) in zip(pairs, stats, strict=True):
        if bb == 0.0:
            if nn > 0.0:
                off.append(p.name)
            continue
        c = bn / bb
        if not 0.0 < c <= 1.0 + rtol or _misfit([p], [[bb, bn, nn]], c, rtol):
            off.append(p.name)
    if off:
        return (
            f"gradients at optimizer.step are not a factor in (0, 1] of what backward left "
            f"(per-tensor clipping declared): {_names(off)}"
        )
    return None


def _norm_rtol(rtol: float) -> float:
    return NORM_RTOL_EXACT if rtol <= RTOL_EXACT else NORM_RTOL_LOW


def _names(names: list[str]) -> str:
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    return ", ".join(names[:5]) + more
