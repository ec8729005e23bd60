"""One rank of DistributedDataParallel (world size 1, gloo): its reducer is changed mid-run
(a comm hook registered, a built-in hook, a bucket setting); prints the guard's alerts.

``python tests/reducer_worker.py SEED STORE``: two runs, one JSON line each: ``honest``
(gradient accumulation under ``no_sync()``, torch's own all-reduce hook registered before
``watch()``, exact or budget mode), ``changed`` (one change at a drawn step) and ``before``
(the script's own hook registered before ``watch()``: reported at start-up).
"""

import contextlib
import json
import random
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from trainguard.monitor import guard as tgw

DDP = torch.nn.parallel.DistributedDataParallel


def _kept(rng: random.Random) -> Callable[[Any, Any], Any]:
    """A hook that averages as torch does, then keeps a fixed share of each bucket."""
    share = rng.choice([0.1, 0.5, 0.9])

    def hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buf = bucket.buffer()
        keep = torch.rand(buf.numel(), generator=torch.Generator().manual_seed(7)) < share
        fut = dist.all_reduce(buf, async_op=True).get_future()  # type: ignore[union-attr]
        return fut.then(lambda f: f.value()[0].div_(dist.get_world_size()).mul_(keep))

    return hook


def _local(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """No all-reduce: each rank keeps its own gradient (no_sync without no_sync())."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def change(rng: random.Random, model: Any) -> str:
    """One change to the reducer, drawn; returns its name."""
    kinds = ["kept", "local", "torch fp16", "builtin", "bucket cap", "bucket view", "c++ hook"]
    kind = rng.choice(kinds)
    if kind == "c++ hook":  # on the C++ reducer: no Python trace, only what it did shows
        dist._register_comm_hook(model.reducer, None, _kept(rng))
    elif kind == "kept":
        model.register_comm_hook(None, _kept(rng))
    elif kind == "local":
        model.register_comm_hook(None, _local)
    elif kind == "torch fp16":  # torch's own code, but not the averaging the run started with
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif kind == "builtin":
        model._register_builtin_comm_hook(dist.BuiltinCommHookType.FP16_COMPRESS)
    elif kind == "bucket cap":
        model.bucket_bytes_cap = rng.choice([1, 1024])
    else:
        model.gradient_as_bucket_view = not model.gradient_as_bucket_view
    return kind


def main() -> None:
    seed, store = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    for mode in ("honest", "changed", "before"):
        print(json.dumps(run(random.Random(f"{seed} {mode}"), mode)), flush=True)
    dist.destroy_process_group()


def run(rng: random.Random, mode: str) -> dict[str, object]:
    torch.manual_seed(rng.randrange(2**31))
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    model = DDP(net, gradient_as_bucket_view=rng.random() < 0.5)
    if mode == "honest" and rng.random() < 0.5:  # torch's own, fp16 compression too: quiet
        hook = rng.choice([default_hooks.allreduce_hook, default_hooks.fp16_compress_hook])
        model.register_comm_hook(None, hook)
    if mode == "before":
        model.register_comm_hook(None, rng.choice([_kept(rng), _local]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = 12
    at = rng.randrange(0, steps) if mode == "changed" else -1
    budget = rng.choice([None, 0.02])
    guard = tgw.watch(model, opt, hang_seconds=None, min_stall_seconds=30.0, budget=budget)
    what = ""
    micro = rng.randrange(1, 4)
    for step in range(steps):
        if step == at:
            what = change(rng, model)
        opt.zero_grad()
        for i in range(micro):
            with contextlib.nullcontext() if i == micro - 1 else model.no_sync():
                loss = model(torch.randn(16, 8)).pow(2).mean() / micro
                loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        guard.step(loss=loss)
    guard.close()
    alerts = [[a.rule, a.step, int(a.severity), a.message] for a in guard.alerts]
    return {"mode": mode, "at": at, "what": what, "budget": budget, "alerts": alerts}


if __name__ == "__main__":
    main()
