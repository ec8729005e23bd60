"""What an optimizer step must leave in the optimizer's *state*, elementwise.

``update_models.py`` predicts the parameter after a step; an attack can leave
the parameter right for this step and poison the state the next steps read
(Adam's ``exp_avg_sq`` scaled by 1.4 inside the step: the effective learning
rate falls by 1.18x per step, inside every size ratio).  These models take the
same sampled values before the step (parameter, gradient, state) and return the
state each ``torch.optim`` optimizer writes: moments, momentum buffers, sums,
step counts, NAdam's ``mu_product``.  A key the model does not return is not
checked.  An optimizer of your own declares its state model with
:func:`register`, as for update models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trainguard.monitor.update_models import Sample, _grad, torch_models

StateModel = Callable[[Sample, dict[str, Any]], dict[str, Any]]
MODELS: dict[str, StateModel] = {}


def register(optimizer_class: type, model: StateModel) -> None:
    MODELS[f"{optimizer_class.__module__}.{optimizer_class.__qualname__}"] = model


def model_for(optimizer: Any) -> StateModel | None:
    cls = type(optimizer)
    return MODELS.get(f"{cls.__module__}.{cls.__qualname__}")


def _step(s: Sample) -> float:
    return s.count() + 1


def _moments(s: Sample, g: Any, b1: float, b2: float) -> dict[str, Any]:
    m = s.get("exp_avg") + (1 - b1) * (g - s.get("exp_avg"))
    return {"exp_avg": m, "exp_avg_sq": b2 * s.get("exp_avg_sq") + (1 - b2) * g * g}


def sgd(s: Sample, group: dict[str, Any]) -> dict[str, Any]:
    momentum = float(group.get("momentum") or 0.0)
    if not momentum:
        return {}
    g, buf = _grad(s, group), s.state.get("momentum_buffer")
    damp = 1 - float(group.get("dampening", 0))
    return {"momentum_buffer": g if buf is None else momentum * buf + damp * g}


def adam(s: Sample, group: dict[str, Any]) -> dict[str, Any]:
    b1, b2 = (float(b) for b in group["betas"])
    out = _moments(s, _grad(s, group), b1, b2)
    if group.get("amsgrad"):
        out["max_exp_avg_sq"] = out["exp_avg_sq"].maximum(s.get("max_exp_avg_sq"))
    return {**out, "step": _step(s)}


def rmsprop(s: Sample, group: dict[str, Any]) -> dict[str, Any]:
    g, alpha, eps = _grad(s, group), float(group["alpha"]), float(group["eps"])
    sq = alpha * s.get("square_avg") + (1 - alpha) * g * g
    out: dict[str, Any] = {"square_avg": sq, "step": _step(s)}
    avg = sq.sqrt() + eps
    if group.get("centered"):
        ga = out["grad_avg"] = s.get("grad_avg") + (1 - alpha) * (g - s.get("grad_avg"))
        avg = (sq - ga * ga).sqrt() + eps
    momentum = float(group.get("momentum") or 0.0)
    if momentum > 0:
        out["momentum_buffer"] = momentum * s.get("momentum_buffer") + g / avg
    return out


def adagrad(s: Sample, group: dict[str, Any]) -> dict[str, Any]:
    g = _grad(s, group)
    start = float(group.get("initial_accumulator_value", 0.0))
    return {"sum": s.get("sum", start) + g * g, "step": _step(s)}


def adadelta(s: Sample, group: dict[str, Any]) -> dict[str, Any]:
    g, rho, eps = _grad(s, group), float(group["rho"]), float(group["eps"])
    sq = rho * s.get("square_avg") + (1 - rho) * g * g
    delta = (s.get("acc_delta") + eps).sqrt() / (sq + eps).sqrt() * g
    acc = rho * s.get("acc_delta") + (1 - rho) * delta * delta
    return {"square_avg": sq, "acc_delta": acc, "step": _step(s)}


def adamax(s: Sample, group: dict[str, Any]) -> dict[str, Any]:
    g = _grad(s, group)
    b1, b2 = (float(b) for b in group["betas"])
    m = s.get("exp_avg") + (1 - b1) * (g - s.get("exp_avg"))
    inf = (b2 * s.get("exp_inf")).maximum(g.abs() + float(group["eps"]))
    return {"exp_avg": m, "exp_inf": inf, "step": _step(s)}


def nadam(s: Sample, group: dict[str, Any]) -> dict[str, Any]:
    b1, b2 = (float(b) for b in group["betas"])
    t = _step(s)
    mu = b1 * (1.0 - 0.5 * 0.96 ** (t * float(group["momentum_decay"])))
    out = _moments(s, _grad(s, group), b1, b2)
    return {**out, "step": t, "mu_product": s.count("mu_product", 1.0) * mu}


def radam(s: Sample, group: dict[str, Any]) -> dict[str, Any]:
    b1, b2 = (float(b) for b in group["betas"])
    return {**_moments(s, _grad(s, group), b1, b2), "step": _step(s)}


MODELS.update(torch_models(globals()))
