"""ParameterIdentityCheck's fast path (checks/params.py) answers as the full comparison.

Generated (seed printed, TRAINGUARD_TEST_SEED reruns one): two checks watch the same
model and optimizer, one with its module-tree fast path, one always walking
``named_parameters()``; random edits (a parameter replaced, a submodule replaced or
added, a parameter slot added or emptied, requires_grad flipped, a param group added,
a group's tensor swapped, nothing) are made between steps, and both must raise the same
alerts at every step.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from tests.seeds import seeded

torch = pytest.importorskip("torch")

from trainguard.monitor.alerts import Context  # noqa: E402
from trainguard.monitor.checks.params import ParameterIdentityCheck  # noqa: E402


def _edit(rng: random.Random, model: Any, opt: Any) -> str:
    kind = rng.choice(
        ["none", "none", "param", "module", "add_module", "slot", "empty", "grad", "group", "swap"]
    )
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    layer = rng.choice(layers)
    if kind == "param":
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone())
    elif kind == "module":
        name = rng.choice([n for n, m in model.named_children() if isinstance(m, torch.nn.Linear)])
        setattr(model, name, torch.nn.Linear(4, 4))
    elif kind == "add_module":
        model.add_module(f"extra{rng.randrange(10**6)}", torch.nn.Linear(4, 4))
    elif kind == "slot":
        layer.register_parameter(f"p{rng.randrange(10**6)}", torch.nn.Parameter(torch.ones(2)))
    elif kind == "empty":
        layer.register_parameter("bias", None)
    elif kind == "grad":
        layer.weight.requires_grad_(not layer.weight.requires_grad)
    elif kind == "group":
        fresh = torch.nn.Parameter(torch.ones(3))
        layer.register_parameter(f"q{rng.randrange(10**6)}", fresh)
        opt.add_param_group({"params": [fresh]})
    elif kind == "swap":
        group = rng.choice(opt.param_groups)
        group["params"][rng.randrange(len(group["params"]))] = torch.nn.Parameter(torch.ones(1))
    return kind


def test_the_tree_fast_path_raises_what_the_full_comparison_raises() -> None:
    rng = seeded()
    for _ in range(6):
        model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(rng.randrange(1, 4))])
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        fast = ParameterIdentityCheck(model, opt)
        full = ParameterIdentityCheck(model, opt)
        full._tree = None
        full._unchanged = lambda: False  # type: ignore[method-assign]
        assert fast._tree is not None
        for step in range(12):
            kind = _edit(rng, model, opt)
            ctx = Context(step, 0)
            a = [(x.rule, x.message) for x in fast.before_step(ctx)]
            b = [(x.rule, x.message) for x in full.before_step(ctx)]
            assert a == b, (step, kind, a, b)
