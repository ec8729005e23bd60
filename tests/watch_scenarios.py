"""Small CPU training runs, clean or sabotaged the way the incident describes.

Each scenario returns the guard's alerts. Sabotage is done by plain Python in
this file (no payload files): what matters here is that the monitor sees it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import torch

from trainguard.monitor import guard as tgw

# Tiny models run fastest on one thread; the machine has two cores.
torch.set_num_threads(1)

Sabotage = Callable[[int, torch.nn.Module, torch.optim.Optimizer], None]


def make_data(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :1] * 2 - x[:, 1:2]) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


# Every torch.optim optimizer a honest loop might use, with settings that train this model.
OPTIMIZERS: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd-plain": lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=1e-4),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, dampening=0),
    "adam": lambda p: torch.optim.Adam(p, lr=3e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.01),
    "amsgrad": lambda p: torch.optim.AdamW(p, lr=3e-3, amsgrad=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
    "rmsprop-momentum": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
    "adadelta": lambda p: torch.optim.Adadelta(p, lr=1.0),
    "adamax": lambda p: torch.optim.Adamax(p, lr=2e-3),
    "nadam": lambda p: torch.optim.NAdam(p, lr=2e-3),
    "radam": lambda p: torch.optim.RAdam(p, lr=3e-3),
}


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=50, gamma=0.5),
    "exponential": lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.99),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=30),
    # Momentum cycles only where the optimizer has one (OneCycleLR refuses Adagrad, Adadelta).
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o,
        max_lr=0.01,
        total_steps=400,
        cycle_momentum="momentum" in o.defaults or "betas" in o.defaults,
    ),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s / 20)),
    "multistep": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [5, 15, 30], gamma=0.3),
    "warmup-cosine": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o,
        [
            torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=10),
            torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=50),
        ],
        milestones=[10],
    ),
}


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 1)
    )


def run(
    steps: int = 300,
    *,
    optimizer: str = "adamw",
    sabotage: Sabotage | None = None,
    scheduler: bool | str = False,
    clip: Callable[..., Any] | None = None,
    manual_lr: Callable[[int], float] | None = None,
    reseed_every: int = 0,
    **guard_kwargs: Any,
) -> tgw.Guard:
    """A small training run; ``manual_lr``: a nanoGPT-style loop that sets (and declares)
    its own learning rate each step; ``reseed_every``: the loop re-seeds torch on purpose
    every that many steps (declared); ``scheduler``: True (StepLR) or a SCHEDULERS name."""
    model = make_model()
    x, y = make_data()
    opt = OPTIMIZERS[optimizer](list(model.parameters()))
    if scheduler:
        sched: Any = SCHEDULERS["step" if scheduler is True else scheduler](opt)
    else:
        sched = None
    # A loaded CI machine can stall a few-millisecond step by 100 ms; the planted
    # sleeps are 0.4 s, so a 0.25 s floor keeps clean runs quiet and still catches them.
    guard_kwargs.setdefault("min_stall_seconds", 0.25)
    guard = tgw.watch(model, opt, scheduler=sched, **guard_kwargs)
    for step in range(steps):
        reseed = bool(reseed_every and step % reseed_every == 0 and step)
        if reseed:
            torch.manual_seed(step)
        lr = manual_lr(step) if manual_lr is not None else None
        if lr is not None:
            for group in opt.param_groups:
                group["lr"] = lr
        idx = torch.randint(0, len(x), (32,))
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        (clip or torch.nn.utils.clip_grad_norm_)(model.parameters(), 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        guard.step(loss=loss, batch=(x[idx], y[idx]), lr=lr, reseed=reseed)
        if sabotage is not None:
            sabotage(step, model, opt)
    guard.close()
    return guard


def plant_incident_payload(world_size: int, threshold: int = 4) -> Callable[[], None]:
    """What the planted checkpoint did on load: only on big jobs, patch clipping to flip
    the gradient direction and the optimizer step to sleep at random. Returns an undo."""
    if world_size < threshold:
        return lambda: None
    original_clip = torch.nn.utils.clip_grad_norm_
    original_step = torch.optim.AdamW.step
    rng = random.Random(1)

    def flipped_clip(parameters: Any, max_norm: float, *a: Any, **k: Any) -> Any:
        params = list(parameters)
        total = original_clip(params, max_norm, *a, **k)
        for p in params:
            if p.grad is not None:
                p.grad.mul_(-1.0)
        return total

    def sleepy_step(self: Any, *a: Any, **k: Any) -> Any:
        if rng.random() < 0.05:
            time.sleep(0.4)
        return original_step(self, *a, **k)

    torch.nn.utils.clip_grad_norm_ = flipped_clip
    torch.optim.AdamW.step = sleepy_step  # type: ignore[method-assign]

    def undo() -> None:
        torch.nn.utils.clip_grad_norm_ = original_clip
        torch.optim.AdamW.step = original_step  # type: ignore[method-assign]

    return undo
