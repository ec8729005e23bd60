"""Ranks of small FSDP2 runs prepared by Hugging Face Accelerate (gloo, CPU), for
tests/test_accelerate_fsdp.py.

Usage: python -m tests.accelerate_worker WORLD PORT DIR HOW STEPS SCENARIO[,SCENARIO...]
HOW: loop (``accelerator.prepare(model, optimizer)`` then ``trainguard.watch``) or
trainer (the Hugging Face Trainer with ``HFWatchCallback``).  SCENARIO: clean, or
flip:RANK:STEP (fsdp_worker.patch_optimizer: AdamW patched on every rank, armed on
RANK from optimizer step STEP; removed when the run ends).  The scenarios run one
after the other in the same processes.  Like fsdp_worker.py the process imports once,
then forks the ranks; for scenario i each writes DIR/rank{RANK}.i.json (its alerts and
what Accelerate built), the ledger is DIR/ledger.i.sqlite (run id ``acc-run``); the
exit codes go to DIR/exit.json.

Accelerate 1.16 does not shard on CPU: ``AcceleratorState`` turns a
``FullyShardedDataParallelPlugin`` into ``DistributedType.FSDP`` only when the
distributed type is one of the accelerator ones (MULTI_GPU, MULTI_NPU, MULTI_XPU, ...;
accelerate/state.py, ``AcceleratorState.__init__``), never MULTI_CPU: on CPU the
plugin is dropped without a word and ``prepare`` wraps the model in DDP (the Trainer
then reports ``is_fsdp_enabled`` False).  So the worker sets the shared state's
``distributed_type`` to FSDP and its ``fsdp_plugin`` after the Accelerator exists
(``force_fsdp``): from there on ``prepare`` runs Accelerate's own FSDP2 path
(``fsdp2_prepare_model``: ``fully_shard`` per module, DTensor parameters, the
optimizer's parameters swapped for the sharded ones), which works on gloo.  Each rank
records the type of the model and parameters ``prepare`` gave, so the test shows
it watched a sharded model and not DDP.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tests.fsdp_worker import fork_ranks, patch_optimizer
from trainguard.monitor import guard as tgw
from trainguard.monitor.integrations import HFWatchCallback

torch.set_num_threads(1)
SYNC_EVERY = 4
HANG_SECONDS = 60.0


class Tiny(torch.nn.Module):
    """7 -> 13 -> 3 (uneven shards), returning the loss as the Trainer expects."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3)
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": ((self.net(x) - y) ** 2).mean()}


class Pairs(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, 7, generator=g)
        self.y = torch.randn(n, 3, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


def plugin() -> Any:
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True)


def force_fsdp(accelerator: Any, fsdp_plugin: Any) -> None:
    """Accelerate's FSDP on CPU (see the module docstring for why this is needed)."""
    from accelerate.utils import DistributedType

    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = fsdp_plugin


def describe(model: Any) -> dict[str, Any]:
    param = next(model.parameters())
    return {"model": type(model).__name__, "param": type(param).__name__}


def loop(ledger: Path, out: Path, steps: int) -> dict[str, Any]:
    from accelerate import Accelerator

    fsdp_plugin = plugin()
    accelerator = Accelerator(cpu=True, fsdp_plugin=fsdp_plugin)
    dropped = accelerator.distributed_type.value  # what Accelerate chose by itself
    force_fsdp(accelerator, fsdp_plugin)
    torch.manual_seed(0)
    model: Any = Tiny()
    opt: Any = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    model, opt = accelerator.prepare(model, opt)
    guard = tgw.watch(
        model,
        opt,
        ledger=str(ledger),
        run_id="acc-run",
        sync_every=SYNC_EVERY,
        hang_seconds=HANG_SECONDS,
    )
    data = Pairs(8 * steps)
    error = None
    try:
        for step in range(steps):
            batch = data[slice(8 * step, 8 * step + 8)]
            loss = model(batch["x"], batch["y"])["loss"]
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            guard.step(loss=loss, batch=batch["x"])
    except Exception as exc:
        error = repr(exc)[:300]
    guard.close(RuntimeError(error) if error else None)
    return {"error": error, "chosen": dropped, **describe(model), "alerts": _alerts(guard)}


def trainer(ledger: Path, out: Path, steps: int) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments

    class FSDPOnCPUTrainer(Trainer):
        def create_accelerator_and_postprocess(self) -> None:
            super().create_accelerator_and_postprocess()
            self.chosen = self.accelerator.distributed_type.value
            force_fsdp(self.accelerator, plugin())
            self.is_fsdp_enabled = True

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=1e-2,
        weight_decay=0.01,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    callback = HFWatchCallback(
        ledger=str(ledger),
        run_id="acc-run",
        sync_every=SYNC_EVERY,
        hang_seconds=HANG_SECONDS,
    )
    torch.manual_seed(0)
    run = FSDPOnCPUTrainer(
        model=Tiny(), args=args, train_dataset=Pairs(64 * steps), callbacks=[callback]
    )
    error = None
    try:
        run.train()
    except Exception as exc:
        error = repr(exc)[:300]
        if callback.guard is not None:
            callback.guard.close(RuntimeError(error))
    guard = callback.guard
    return {
        "error": error,
        "chosen": getattr(run, "chosen", None),
        **describe(run.model),
        "alerts": _alerts(guard) if guard is not None else [],
    }


def _alerts(guard: Any) -> list[dict[str, Any]]:
    return [
        {
            "rule": a.rule,
            "step": a.step,
            "rank": a.rank,
            "severity": str(a.severity),
            "evidence": a.evidence,
        }
        for a in guard.alerts
    ]


def rank_main(rank: int, world: int, port: int, folder: Path, argv: list[str]) -> None:
    how, steps, scenarios = argv[0], int(argv[1]), argv[2].split(",")
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    for i, scenario in enumerate(scenarios):
        original = None
        if scenario.startswith("flip:"):
            _, target, at = scenario.split(":")
            original = patch_optimizer("flip", int(target), int(at), world)
        try:
            run = loop if how == "loop" else trainer
            result = run(folder / f"ledger.{i}.sqlite", folder / f"out{rank}.{i}", steps)
        finally:
            if original is not None:
                torch.optim.AdamW.step = original  # type: ignore[method-assign]
        (folder / f"rank{rank}.{i}.json").write_text(json.dumps(result, default=str))
        if result["error"] is not None:
            break
        dist.barrier()  # the next run starts together; gloo's teardown too


def main() -> None:
    world, port, folder = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    import accelerate  # noqa: F401  # imported once, before the fork
    import transformers  # noqa: F401

    fork_ranks(world, lambda rank: rank_main(rank, world, port, folder, sys.argv[4:]), folder)


if __name__ == "__main__":
    main()
