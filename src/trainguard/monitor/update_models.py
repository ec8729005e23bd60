"""What an optimizer step must give: the math of every ``torch.optim`` optimizer, elementwise.

Each model takes the parameter's values, gradient and optimizer state *before*
the step, at a few sampled elements (in float64), and the param group's
settings, and returns the parameter's values the step must produce there.
Every ``torch.optim`` update is elementwise, so a sample predicts exactly what
the whole step does at those elements (see checks/update.py for the comparison).
A missing state entry is the value the optimizer initialises it to on its first
step (zeros; a step count of 0; NAdam's ``mu_product`` of 1).

An optimizer of your own declares its model with :func:`register`:

    def my_model(s: Sample, group: dict) -> torch.Tensor:
        return s.param - group["lr"] * s.grad  # plain SGD

    trainguard.monitor.update_models.register(MyOptimizer, my_model)

Only an exact class match is used: a subclass may change the math.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Sample:
    """One parameter before the step, at the sampled elements (float64 tensors)."""

    param: Any
    grad: Any
    state: dict[str, Any]  # sampled state tensors, and plain floats for scalar state

    def get(self, key: str, default: float = 0.0) -> Any:
        value = self.state.get(key)
        if value is None:
            return self.param * 0.0 + default
        return value

    def count(self, key: str = "step", default: float = 0.0) -> float:
        value = self.state.get(key)
        return float(value) if isinstance(value, (int, float)) else default


UpdateModel = Callable[[Sample, dict[str, Any]], Any]
MODELS: dict[str, UpdateModel] = {}  # by the optimizer class's module and qualified name


def register(optimizer_class: type, model: UpdateModel) -> None:
    """Declare what ``optimizer_class``'s step does (see the module docstring)."""
    MODELS[_name(optimizer_class)] = model


def model_for(optimizer: Any) -> UpdateModel | None:
    return MODELS.get(_name(type(optimizer)))


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _grad(s: Sample, group: dict[str, Any]) -> Any:
    g = -s.grad if group.get("maximize") else s.grad
    wd = float(group.get("weight_decay") or 0.0)
    if wd and not group.get("decoupled_weight_decay"):
        g = g + wd * s.param
    return g


def _decayed(s: Sample, group: dict[str, Any]) -> Any:
    wd = float(group.get("weight_decay") or 0.0)
    if wd and group.get("decoupled_weight_decay"):
        return s.param * (1 - float(group["lr"]) * wd)
    return s.param


def sgd(s: Sample, group: dict[str, Any]) -> Any:
    g = _grad(s, group)
    momentum = float(group.get("momentum") or 0.0)
    if momentum:
        buf = s.state.get("momentum_buffer")
        buf = g if buf is None else momentum * buf + (1 - float(group.get("dampening", 0))) * g
        g = g + momentum * buf if group.get("nesterov") else buf
    return s.param - float(group["lr"]) * g


def adam(s: Sample, group: dict[str, Any]) -> Any:
    g, p = _grad(s, group), _decayed(s, group)
    lr, eps = float(group["lr"]), float(group["eps"])
    b1, b2 = (float(b) for b in group["betas"])
    t = s.count() + 1
    m = s.get("exp_avg") + (1 - b1) * (g - s.get("exp_avg"))
    v = b2 * s.get("exp_avg_sq") + (1 - b2) * g * g
    if group.get("amsgrad"):
        v = v.maximum(s.get("max_exp_avg_sq"))
    denom = v.sqrt() / math.sqrt(1 - b2**t) + eps
    return p - lr / (1 - b1**t) * m / denom


def rmsprop(s: Sample, group: dict[str, Any]) -> Any:
    g = _grad(s, group)
    lr, alpha, eps = float(group["lr"]), float(group["alpha"]), float(group["eps"])
    sq = alpha * s.get("square_avg") + (1 - alpha) * g * g
    if group.get("centered"):
        ga = s.get("grad_avg") + (1 - alpha) * (g - s.get("grad_avg"))
        avg = (sq - ga * ga).sqrt() + eps
    else:
        avg = sq.sqrt() + eps
    momentum = float(group.get("momentum") or 0.0)
    if momentum > 0:
        return s.param - lr * (momentum * s.get("momentum_buffer") + g / avg)
    return s.param - lr * g / avg


def adagrad(s: Sample, group: dict[str, Any]) -> Any:
    g = _grad(s, group)
    t = s.count() + 1
    clr = float(group["lr"]) / (1 + (t - 1) * float(group.get("lr_decay", 0.0)))
    total = s.get("sum", float(group.get("initial_accumulator_value", 0.0))) + g * g
    return s.param - clr * g / (total.sqrt() + float(group["eps"]))


def adadelta(s: Sample, group: dict[str, Any]) -> Any:
    g = _grad(s, group)
    rho, eps = float(group["rho"]), float(group["eps"])
    sq = rho * s.get("square_avg") + (1 - rho) * g * g
    delta = (s.get("acc_delta") + eps).sqrt() / (sq + eps).sqrt() * g
    return s.param - float(group["lr"]) * delta


def adamax(s: Sample, group: dict[str, Any]) -> Any:
    g = _grad(s, group)
    b1, b2 = (float(b) for b in group["betas"])
    t = s.count() + 1
    m = s.get("exp_avg") + (1 - b1) * (g - s.get("exp_avg"))
    inf = (b2 * s.get("exp_inf")).maximum(g.abs() + float(group["eps"]))
    return s.param - float(group["lr"]) / (1 - b1**t) * m / inf


def nadam(s: Sample, group: dict[str, Any]) -> Any:
    g, p = _grad(s, group), _decayed(s, group)
    lr, eps, decay = float(group["lr"]), float(group["eps"]), float(group["momentum_decay"])
    b1, b2 = (float(b) for b in group["betas"])
    t = s.count() + 1
    mu = b1 * (1.0 - 0.5 * 0.96 ** (t * decay))
    mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * decay))
    product = s.count("mu_product", 1.0) * mu
    m = s.get("exp_avg") + (1 - b1) * (g - s.get("exp_avg"))
    v = b2 * s.get("exp_avg_sq") + (1 - b2) * g * g
    denom = (v / (1 - b2**t)).sqrt() + eps
    p = p - lr * (1 - mu) / (1 - product) * g / denom
    return p - lr * mu_next / (1 - product * mu_next) * m / denom


def radam(s: Sample, group: dict[str, Any]) -> Any:
    g, p = _grad(s, group), _decayed(s, group)
    lr, eps = float(group["lr"]), float(group["eps"])
    b1, b2 = (float(b) for b in group["betas"])
    t = s.count() + 1
    m = s.get("exp_avg") + (1 - b1) * (g - s.get("exp_avg"))
    v = b2 * s.get("exp_avg_sq") + (1 - b2) * g * g
    bc2 = 1 - b2**t
    m_hat = m / (1 - b1**t)
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * b2**t / bc2
    if rho_t <= 5.0:
        return p - lr * m_hat
    rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
    return p - lr * m_hat * rect * math.sqrt(bc2) / (v.sqrt() + eps)


# Each torch.optim class and the name of the function that models it; every
# models module (updates here, state in state_models) names its functions alike.
TORCH_OPTIMIZERS = {
    "SGD": "sgd",
    "Adam": "adam",
    "AdamW": "adam",
    "RMSprop": "rmsprop",
    "Adagrad": "adagrad",
    "Adadelta": "adadelta",
    "Adamax": "adamax",
    "NAdam": "nadam",
    "RAdam": "radam",
}


def torch_models(functions: dict[str, Any]) -> dict[str, Any]:
    """The torch.optim entries of a MODELS table, from a module's functions by name."""
    return {f"torch.optim.{c.lower()}.{c}": functions[f] for c, f in TORCH_OPTIMIZERS.items()}


MODELS.update(torch_models(globals()))
