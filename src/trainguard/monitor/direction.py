"""Does the update follow the gradient?

Two cheap checks, both computed on the tensors' device:

1. Gradient probe: when backward finishes accumulating a parameter's gradient,
   its elements at keyed sample indices are recorded; at ``optimizer.step``
   time they are read again.  Clipping and loss-scale unscaling only multiply
   gradients by a positive factor, so the two samples must point the same way
   (a positive dot product).  A flipped clipping (the incident) makes it
   negative.  Reading a few hundred elements instead of summing the whole
   gradient keeps the probe's cost independent of the model's size.
2. Update direction on keyed samples: for SGD and Adam/AdamW the direction an
   update must take follows from the gradient and the optimizer's state after
   the step.  A few hundred elements per parameter, at indices chosen from the
   run's secret key, are read before and after the step and compared with that
   direction by cosine similarity.  A flipped update sign gives about -1.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from trainguard.errors import UsageError
from trainguard.monitor.accumulation import Passes
from trainguard.monitor.gradfactor import (
    RTOL_DISTRIBUTED,
    RTOL_EXACT,
    RTOL_LOW,
    FactorJudge,
    Pair,
)
from trainguard.monitor.gradtransform import DEFAULT_RULES, DeclaredTransform, GradRules
from trainguard.monitor.kinds import Unchecked, unreadable
from trainguard.monitor.safety import compile_safe
from trainguard.monitor.setup import total_grad_norm
from trainguard.monitor.sharding import is_dtensor, local, state_owner

SAMPLES_PER_PARAM = 256


@dataclass
class DirectionReport:
    flipped_grads: list[str] = field(default_factory=list)
    cosine: float | None = None


class DirectionCheck:
    def __init__(
        self,
        named_params: list[tuple[str, Any]],
        key: bytes,
        rules: GradRules = DEFAULT_RULES,
        *,
        norm_rule: bool = True,
    ) -> None:
        import torch

        self.torch = torch
        # Tensors the probe cannot read (sparse gradients, complex weights...): skipped and
        # named once (monitor/kinds.py), never a crash in the user's backward.
        self.unchecked = Unchecked()
        self.params: list[tuple[str, Any]] = []
        self.index: dict[int, Any] = {}
        self.names: dict[int, str] = {}
        self._gen = torch.Generator().manual_seed(int.from_bytes(key[8:16], "little") & (2**62))
        self.backward_samples: dict[int, Any] = {}
        # A declared grad_transform (monitor/gradtransform.py): backward's whole gradients.
        self.transform = DeclaredTransform(rules.transform) if rules.transform else None
        self.backward_whole: dict[int, Any] = {}
        self.before: dict[int, Any] = {}
        self.grad_at_step: dict[int, Any] = {}
        # Our hook must run as plain Python under torch.compile: traced, dynamo would copy
        # the guard's globals into torch's modules and bake the sample indices into graphs.
        self._hook = compile_safe(self._on_grad)
        # Budget mode: the gradient samples are read only in the backward of a step whose
        # probe the schedule drew (checks/direction.py arms it); their seconds go to it.
        self.armed = True
        self.outside = 0.0
        self.handles: list[Any] = []
        # Gradient accumulation: each backward pass's contribution (accumulation.py).
        self.passes = Passes(torch)
        self.accumulation: str | None = None  # what broke it, at this step's pre-hook
        self.adopt([(n, p) for n, p in named_params if p.requires_grad])
        # Sharded gradients (FSDP) reach the hook already reduced, one slice per rank:
        # nothing to average, and the slices' sample counts differ between ranks.
        self.distributed = _distributed() and not any(is_dtensor(p) for _, p in self.params)
        # Under a process group DDP may compress what it communicates (torch's fp16 hook),
        # a single rank too: the samples then fit only to that rounding.
        self.communicated = _distributed(alone=True)
        if self.transform is not None and self.distributed:
            # The hook sees this rank's gradient before DDP averages it; the loop transforms
            # the average: re-applying fn would need the average of the whole gradients.
            raise UsageError("watch: grad_transform is not supported with several ranks yet")
        # Each parameter's sampled moment after the last step; None after a step the
        # probe skipped (budget mode): the moments' change is then unknown.
        self.moments: dict[int, Any] | None = {}
        self.mismatch: str | None = None
        # What may happen to a gradient between backward and the step (gradfactor.py);
        # ``broken`` says what did not, at this step's pre-hook.
        # A sharded gradient's norm here is this rank's slice, not what clipping saw.
        sharded = any(is_dtensor(p) for _, p in self.params)
        self.factor = FactorJudge(
            rules.clipping, norm_rule=norm_rule and not sharded, scaling=rules.scaling
        )
        self.broken: str | None = None
        self.norm_now: float | None = None  # the total gradient norm, when taken this step

    def adopt(self, named: list[tuple[str, Any]], *, hook: bool = True) -> None:
        """Start probing these parameters (at start-up, and for a param group added later:
        then without a gradient hook, which the identity check would rightly call a new
        hook; their update is still compared with the direction at each step)."""
        torch = self.torch
        known = {id(p) for _, p in self.params}
        for name, p in named:
            if id(p) in known:
                continue
            self.params.append((name, p))
            self.names[id(p)] = name
            why = unreadable(local(p))
            if why is not None:
                self.unchecked.add(name, why)
                continue
            n = local(p).numel()
            if n:
                # Indices into what this rank holds (a DTensor's local shard, see sharding.py).
                draw = torch.randint(0, n, (min(SAMPLES_PER_PARAM, n),), generator=self._gen)
                self.index[id(p)] = draw.to(local(p).device)
            if hook:
                self.handles.append(p.register_post_accumulate_grad_hook(self._hook))
                if n and not is_dtensor(p):  # FSDP sets a DTensor's .grad; autograd does not
                    self.handles.append(p.register_hook(self._incoming(p)))

    def _incoming(self, p: Any) -> Any:
        """The tensor hook reading what autograd hands ``p``, before it is accumulated."""
        pid, shape = id(p), p.shape

        def hook(grad: Any) -> None:
            if not self.armed:
                return
            started = time.perf_counter()
            sample = None
            try:
                if unreadable(grad) is None and grad.shape == shape:
                    sample = grad.detach().reshape(-1)[self.index[pid]]
            except Exception:  # unread: that pass restarts the sum unjudged
                sample = None
            # The weights too: a loop that moves them between passes (SAM) drops on purpose.
            weights = p.detach().reshape(-1)[self.index[pid]]
            self.passes.incoming(pid, sample, p.grad is None, weights)
            self.outside += time.perf_counter() - started

        return compile_safe(hook)

    def _on_grad(self, p: Any) -> None:
        if not self.armed or p.grad is None or id(p) not in self.index:
            return
        started = time.perf_counter()
        try:
            grad = local(p.grad)
            why = unreadable(grad)
            if why is not None:
                self.unchecked.add(self.names.get(id(p), "?"), f"gradient {why}")
                return
            # Widened at the step, not here: backward pays only for the read.
            sample = grad.detach().reshape(-1)[self.index[id(p)]]
            self.backward_samples[id(p)] = sample
            self.passes.accumulated(id(p), sample)
            if self.transform is not None:
                self.backward_whole[id(p)] = grad.detach().clone()
        except Exception as e:  # a check never ends the user's backward
            self.unchecked.add(self.names.get(id(p), "?"), f"probe failed: {e!r}"[:200])
            self.backward_samples.pop(id(p), None)
            self.backward_whole.pop(id(p), None)
        self.outside += time.perf_counter() - started

    def skip(self) -> None:
        """A step the probe does not check (budget mode): forget what it cannot compare."""
        self.backward_samples.clear()
        self.backward_whole.clear()
        self.moments = None
        self.norm_now = None  # the guard's grad_norm must not read an older step's
        self.passes.clear()
        self.passes.boundary()

    def keep_reference(self) -> None:
        """The gradients now, as the next step's first backward may find them (a loop that
        never zeroes them): taken at a skipped step before a probed one (budget mode)."""
        self.passes.reference.clear()
        for _, p in self.params:
            grad = p.grad
            if id(p) in self.index and grad is not None and unreadable(local(grad)) is None:
                sample = local(grad).detach().reshape(-1)[self.index[id(p)]]
                self.passes.reference[id(p)] = sample.to(self.torch.float64)

    def before_step(self) -> list[str]:
        """At optimizer.step entry: sample weights, compare gradient sums. Names flipped ones."""
        torch = self.torch
        self.before.clear()
        self.grad_at_step.clear()
        # One slot per parameter with samples, in a fixed order, zeros where a
        # parameter has no gradient: every rank sends the same shape to all_reduce
        # (and takes part even when it has nothing), so ranks never misalign.
        slots: list[tuple[str, Any, Any]] = []
        self.broken, self.norm_now = None, None
        # The sum of the step's backward passes, and what broke the accumulation.
        sums, self.accumulation = self.passes.judge(self.names)
        self.passes.boundary()
        gone: list[str] = []  # a gradient backward left that the step cannot read as it was
        had: set[str] = set()  # parameters whose gradient backward left (and we sampled)
        low = False  # a gradient below float32: rounding at 2^-8
        failed = self.transform.moved() if self.transform is not None else None
        for name, p in self.params:
            if id(p) not in self.index:
                continue
            idx = self.index[id(p)]
            back = sums.get(id(p), self.backward_samples.get(id(p)))
            whole = self.backward_whole.pop(id(p), None)
            if back is not None and whole is not None and self.transform is not None:
                try:  # what the declared transform makes of backward's gradient
                    back = self.transform.apply(name, p, whole).detach().reshape(-1)[idx]
                except Exception as e:  # the loop's fn failing on backward's gradient
                    failed = failed or f"the declared grad_transform failed on {name}: {e!r}"
            back = back.to(torch.float64) if back is not None else None
            if back is not None:
                had.add(name)
            grad = p.grad
            why = unreadable(local(grad)) if grad is not None else "None"
            if why is None and back is not None and tuple(grad.shape) != tuple(p.shape):
                why = f"of shape {tuple(grad.shape)}"
            if why is not None:
                if back is not None:
                    gone.append(f"{name} ({why})")
                elif grad is not None:
                    self.unchecked.add(name, f"gradient {why}")
                slots.append(
                    (name, None, torch.zeros(idx.numel(), dtype=torch.float64, device=idx.device))
                )
                continue
            low = low or local(grad).element_size() < 4
            self.before[id(p)] = local(p).detach().reshape(-1)[idx].to(torch.float64)
            now = local(grad).detach().reshape(-1)[idx].to(torch.float64)
            self.grad_at_step[id(p)] = now
            self.passes.reference[id(p)] = now
            if back is None or back.shape != now.shape:
                back = torch.zeros_like(now)
            slots.append((name, now, back))
        self.backward_samples.clear()
        self.backward_whole.clear()
        if gone:
            self.broken = (
                f"{len(gone)} gradient(s) backward left are not there at optimizer.step as "
                f"they were: {', '.join(gone[:5])}"
            )
        if self.broken is None and failed is not None:
            self.broken = failed[:300]
        if not slots or (not self.distributed and all(n is None for _, n, _ in slots)):
            return []
        backs = torch.cat([b for _, _, b in slots])
        own = backs.clone() if self.distributed else None  # all_reduce writes in place
        if self.distributed:
            # Data-parallel ranks average their gradients after backward: compare
            # with the average of every rank's backward samples, not our own.
            import torch.distributed as dist

            dist.all_reduce(backs)
            backs = backs / dist.get_world_size()
        sizes = [int(b.numel()) for _, _, b in slots]
        nows = [
            n if n is not None else torch.zeros_like(b)
            for (_, n, _), b in zip(slots, backs.split(sizes), strict=True)
        ]
        stats = torch.stack(
            [
                torch.stack([(b * n).sum(), b.norm() * n.norm()])
                for b, n in zip(backs.split(sizes), nows, strict=True)
            ]
        )
        pairs = [
            Pair(name, b, n)
            for (name, n, _), b in zip(slots, backs.split(sizes), strict=True)
            if n is not None and name in had
        ]
        mine = None
        if own is not None:
            mine = [
                Pair(name, b, n)
                for (name, n, _), b in zip(slots, own.split(sizes), strict=True)
                if n is not None and name in had
            ]
        rtol = RTOL_DISTRIBUTED if self.communicated else (RTOL_LOW if low else RTOL_EXACT)
        if self.broken is None:
            self.broken = self.factor.judge(torch, pairs, rtol, self._total_norm, mine)
        flipped = []
        # One transfer for all parameters (a device sync per parameter costs more on a GPU).
        for (name, now, _), (dot, norm) in zip(slots, stats.to("cpu").tolist(), strict=True):
            # A positive factor (clipping, unscaling) keeps the two samples pointing
            # the same way (cosine 1, or 0 for a gradient zero at every index);
            # below -0.5 leaves room for reduced-precision gradient communication.
            if now is not None and norm > 0.0 and dot < -0.5 * norm:
                flipped.append(name)
        return flipped

    def _total_norm(self) -> float:
        """The optimizer's total gradient norm now (kept: the guard's own grad_norm reads it)."""
        if self.norm_now is None:
            self.norm_now = total_grad_norm(self.params, self.torch)
        return self.norm_now

    def after_step(self, optimizer: Any) -> float | None:
        """Cosine between the sampled update and the direction the optimizer prescribes.

        Also sets :attr:`mismatch` when the step's math does not hold (see
        :func:`_step_math`): the moments did not take this step's gradient, or the
        update is not the size the learning rate gives.
        """
        torch = self.torch
        deltas, expected, sizes, moved, pushed = [], [], [], [], []
        self.mismatch = None
        optimizer = state_owner(optimizer)  # ZeRO: the local optimizer, its own parameters
        moments_before, self.moments = self.moments, {}
        known = moments_before is not None
        for group in optimizer.param_groups:
            for p in group["params"]:
                before = self.before.get(id(p))
                if before is None:
                    continue
                idx = self.index[id(p)]
                delta = local(p).detach().reshape(-1)[idx].to(torch.float64) - before
                grad = self.grad_at_step[id(p)]
                direction = _prescribed(optimizer, group, p, idx, before, grad, torch)
                if direction is None:
                    return None  # an optimizer we cannot reason about
                deltas.append(delta)
                expected.append(direction)
                math_ = _step_math(
                    optimizer, group, p, idx, before, grad, moments_before or {}, torch
                )
                if math_ is not None:
                    moment, now, push, exact = math_
                    self.moments[id(p)] = now
                    if known:  # after a skipped step the change of the moment is unknown
                        moved.append(moment)
                        pushed.append(push)
                    if exact:  # float32 or wider: the update's size is exact enough to check
                        spacing = _spacing(before, local(p).dtype, torch)
                        sizes.append((delta, float(group["lr"]) * direction, spacing))
        if not deltas:
            return None
        self.mismatch = _judge_math(torch, moved, pushed, sizes)
        d = torch.cat(deltas)
        e = torch.cat(expected)
        norm = float(d.norm() * e.norm())
        if norm == 0.0 or not math.isfinite(norm):
            return None
        return float((d * e).sum()) / norm

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _distributed(*, alone: bool = False) -> bool:
    """A process group of several ranks (``alone``: of any size) is initialised."""
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return alone or dist.get_world_size() > 1


def _prescribed(
    optimizer: Any, group: dict[str, Any], p: Any, idx: Any, before: Any, grad: Any, torch: Any
) -> Any:
    """The update direction (up to a positive factor) the optimizer must take at ``idx``."""
    name = type(optimizer).__name__
    state = optimizer.state.get(p, {})
    # maximize negates the gradient before anything else; the moments then carry
    # that sign, and every update is minus what the optimizer accumulated.
    sign = -1.0 if group.get("maximize") else 1.0
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    if name == "SGD":
        buf = state.get("momentum_buffer")
        g = sign * grad + wd * before
        if buf is not None and group.get("momentum", 0):
            b = local(buf).detach().reshape(-1)[idx].to(torch.float64)
            if group.get("nesterov"):
                return -(g + float(group["momentum"]) * b)
            return -b
        return -g
    if name in ("Adam", "AdamW"):
        if "exp_avg" not in state:
            return None
        step = float(state["step"])
        beta1, beta2 = (float(b) for b in group["betas"])
        m = local(state["exp_avg"]).detach().reshape(-1)[idx].to(torch.float64) / (1 - beta1**step)
        v_key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
        v = local(state[v_key]).detach().reshape(-1)[idx].to(torch.float64) / (1 - beta2**step)
        u = m / (v.sqrt() + float(group["eps"]))
        decoupled = name == "AdamW" or group.get("decoupled_weight_decay")
        if decoupled and wd:
            u = u + wd * before
        return -u
    return None


# The update's size may differ from lr x the prescribed step by this factor (rounding of
# low-order bits; a scaled step is off by its scale).
SIZE_TOLERANCE = 1.25
# An element's update is judged by its size only where lr x the prescribed step is at
# least this many spacings of the parameter's float format at its value: each stored
# weight is rounded to its spacing (twice with decoupled weight decay), so below that
# the change seen is the rounding, not the step.  A schedule annealing to a tiny lr
# (OneCycleLR's last step at lr ~1e-8, cosine or linear decay to 0) put every update
# under the spacing of float32 weights: "0.737 times the size" was TG1306 critical on
# an honest Lightning run (red team s5).  At 32 spacings the rounding is at most 1/16 of
# the step, well inside SIZE_TOLERANCE.
ROUNDING_SPACINGS = 32.0


def _spacing(values: Any, dtype: Any, torch: Any) -> Any:
    """The distance to the next representable number of ``dtype`` at each of ``values``
    (float64), within a factor of two: eps x |value|, and at least the smallest normal."""
    info = torch.finfo(dtype)
    return (values.abs() * info.eps).clamp_min(info.tiny)


def _step_math(
    optimizer: Any,
    group: dict[str, Any],
    p: Any,
    idx: Any,
    before: Any,
    grad: Any,
    moments_before: dict[int, Any],
    torch: Any,
) -> tuple[Any, Any, Any, bool] | None:
    """(moment change, moment now, what must have pushed it, sizes exact?) for SGD and Adam(W).

    Adam's ``exp_avg`` and SGD's ``momentum_buffer`` must move by a positive multiple of
    this step's gradient (plus ``weight_decay x p`` where the decay goes through the
    gradient): ``m_t - beta1 m_(t-1) = (1 - beta1) g``.  A gradient negated or replaced
    inside ``optimizer.step`` (after the guard's pre-hook read it) breaks this, even
    though the update then follows the poisoned moments.
    """
    name = type(optimizer).__name__
    state = optimizer.state.get(p, {})
    sign = -1.0 if group.get("maximize") else 1.0
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    if name in ("Adam", "AdamW") and "exp_avg" in state:
        slot, factor = "exp_avg", float(group["betas"][0])
        decoupled = name == "AdamW" or group.get("decoupled_weight_decay")
        push = sign * grad + (0.0 if decoupled else wd) * before
    elif name == "SGD" and group.get("momentum") and state.get("momentum_buffer") is not None:
        slot, factor = "momentum_buffer", float(group["momentum"])
        push = sign * grad + wd * before
    else:
        return None
    now = local(state[slot]).detach().reshape(-1)[idx].to(torch.float64)
    previous = moments_before.get(id(p))
    moment = now - factor * previous if previous is not None else now
    exact = local(p).element_size() >= 4
    return moment, now, push, exact


def _judge_math(torch: Any, moved: list[Any], pushed: list[Any], sizes: list[Any]) -> str | None:
    if moved:
        m, g = torch.cat(moved), torch.cat(pushed)
        norm = float(m.norm() * g.norm())
        if norm > 0.0 and math.isfinite(norm) and float((m * g).sum()) < -0.5 * norm:
            return "the optimizer's moments moved against this step's gradient"
    if sizes:
        d = torch.cat([a for a, _, _ in sizes])
        e = torch.cat([b for _, b, _ in sizes])
        # Only elements whose step is many spacings of their weight say its size.
        kept = e.abs() >= ROUNDING_SPACINGS * torch.cat([s for _, _, s in sizes])
        d, e = d[kept], e[kept]
        scale = float((e * e).sum())
        if scale > 0.0 and math.isfinite(scale):
            ratio = float((d * e).sum()) / scale
            if not 1 / SIZE_TOLERANCE <= ratio <= SIZE_TOLERANCE:
                return f"the update is {ratio:.3g} times the size the learning rate gives"
    return None
