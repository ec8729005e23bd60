"""DistributedDataParallel averaged every rank's gradient (TG1304).

reducer.py compares the reducer's Python-visible state; this checks what the
reducer did, whatever did it (a comm hook registered on the C++ reducer
directly, a patched reducer, a rank left out of the average): at the end of
each backward whose gradients DDP synchronises, the gradient of every DDP
parameter at keyed elements must be the mean over ranks of each rank's local
gradient there.

* The local gradient is read in the parameter's post-accumulate-grad hook: it
  runs inside AccumulateGrad, before the reducer's hook on that node marks the
  parameter ready (its bucket cannot be launched before), so ``.grad`` still
  holds this rank's own (accumulated) gradient.
* The reduced gradient is read when backward ends: a callback queued at the
  first local read queues a second one, which runs after the reducer's own
  end-of-backward callback has written the averaged buckets into ``.grad``
  (before any clipping or unscaling the loop does afterwards).
* At the optimizer's step pre-hook, one ``all_reduce`` over the DDP's process
  group sums the local samples, their magnitudes and a count of the ranks that
  read each parameter; where every rank read it, the reduced sample must equal
  the mean within float32 rounding (1e-4 of the mean magnitude).  World size 1:
  the reduced gradient equals the local one.

A backward run under ``no_sync()`` (the flag as the forward saw it) is not
compared: DDP averages nothing then, and settings.py judges the step whose last
micro-step ran so (TG1318).  A DDP that had a comm hook at start-up other than
torch's plain all-reduce (fp16 compression, PowerSGD: they change the values
on purpose) is not compared; reducer.py reported a hook from outside torch.
Cost: two small gathers per parameter per synced backward, one all-reduce of
``3 x 8`` numbers per parameter per step.
"""

from __future__ import annotations

from typing import Any

from trainguard.findings import Severity
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check
from trainguard.monitor.forwards import ForwardWatch
from trainguard.monitor.safety import compile_safe

SAMPLES = 8  # keyed elements per parameter
RTOL = 1e-4  # of the mean magnitude: float32 rounding of DDP's division and sum
MAX_NAMED = 20


def _plain(m: Any) -> bool:
    """No comm hook, or torch's own plain all-reduce."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    hooks = [h for h, _ in list(getattr(m, "_comm_hooks", ()))]
    try:
        builtin = m._get_ddp_logging_data().get("comm_hook")
    except Exception:
        builtin = None
    return builtin in (None, "", default_hooks.allreduce_hook.__qualname__) and all(
        h is default_hooks.allreduce_hook for h in hooks
    )


class AveragedCheck(Check):
    def __init__(self, model: Any, key: bytes, forwards: ForwardWatch) -> None:
        import torch

        self.torch = torch
        from torch.nn.parallel import DistributedDataParallel

        self.ddps = [m for m in model.modules() if isinstance(m, DistributedDataParallel)]
        self.ddps = [m for m in self.ddps if _plain(m)]
        gen = torch.Generator().manual_seed(int.from_bytes(key[16:24], "little") & (2**62))
        self.params: list[tuple[Any, str, Any, Any]] = []  # (ddp, name, param, indices)
        self.handles: list[Any] = []
        # Plain Python under torch.compile (as the gradient probe's hook, direction.py).
        hook = compile_safe(self._local)
        for m in self.ddps:
            for name, p in m.named_parameters():
                if not p.requires_grad or p.numel() == 0 or p.is_sparse:
                    continue
                idx = torch.randint(0, p.numel(), (min(SAMPLES, p.numel()),), generator=gen)
                self.params.append((m, name, p, idx.to(p.device)))
                param: Any = p  # torch leaves the hook registration untyped
                self.handles.append(param.register_post_accumulate_grad_hook(hook))
        self.index = {id(p): i for i, (_, _, p, _) in enumerate(self.params)}
        self.local: dict[int, Any] = {}
        self.reduced: dict[int, Any] = {}
        self._queued = False
        self._synced = True  # the DDP sync flag the last forward with gradients saw
        if self.ddps:
            forwards.starts.append(self._forward)

    def _forward(self, grad: bool) -> None:
        if grad:
            self._synced = all(getattr(m, "require_backward_grad_sync", True) for m in self.ddps)

    def _local(self, p: Any) -> None:
        i = self.index.get(id(p))
        if i is None or p.grad is None or not self._synced:
            return
        self.local[i] = p.grad.detach().reshape(-1)[self.params[i][3]].to(self.torch.float64)
        if not self._queued:
            self._queued = True
            engine = self.torch.autograd.Variable._execution_engine
            # Queued now, this runs before the reducer's end-of-backward callback (queued at
            # its last bucket); the one it queues runs after it.
            engine.queue_callback(lambda: engine.queue_callback(self._reduced))

    def _reduced(self) -> None:
        self._queued = False
        for i in self.local:
            p, idx = self.params[i][2], self.params[i][3]
            if p.grad is not None:
                self.reduced[i] = p.grad.detach().reshape(-1)[idx].to(self.torch.float64)

    def before_step(self, ctx: Context) -> list[Alert]:
        if not self.params:
            return []
        local, reduced = self.local, self.reduced
        self.local, self.reduced = {}, {}
        torch = self.torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return []
        bad: list[str] = []
        for m in self.ddps:
            mine = [i for i, (d, _, _, _) in enumerate(self.params) if d is m]
            device = self.params[mine[0]][3].device if mine else "cpu"
            parts, counts, absparts = [], [], []
            for i in mine:
                n = self.params[i][3].numel()
                got = local.get(i)
                z = torch.zeros(n, dtype=torch.float64, device=device)
                parts.append(got if got is not None else z)
                absparts.append(got.abs() if got is not None else z)
                counts.append(1.0 if got is not None and i in reduced else 0.0)
            if not parts:
                continue
            flat = torch.cat(
                [*parts, *absparts, torch.tensor(counts, dtype=torch.float64, device=device)]
            )
            group = getattr(m, "process_group", None)
            world = dist.get_world_size(group)
            if world > 1:
                dist.all_reduce(flat, group=group)
            total = sum(int(p.numel()) for p in parts)
            sums, mags, seen = flat[:total], flat[total : 2 * total], flat[2 * total :]
            sizes = [int(p.numel()) for p in parts]
            for i, s, a, c in zip(
                mine, sums.split(sizes), mags.split(sizes), seen.tolist(), strict=True
            ):
                if c != world or i not in reduced:
                    continue
                mean, scale = s / world, a / world
                if bool(((reduced[i] - mean).abs() > RTOL * scale + 1e-30).any()):
                    bad.append(self.params[i][1])
        if not bad:
            return []
        return [
            ctx.alert(
                "TG1304",
                f"DistributedDataParallel wrote gradients that are not the mean of every rank's "
                f"local gradient (at keyed elements, end of backward): {', '.join(bad[:5])}",
                severity=Severity.CRITICAL,
                tensors=bad[:MAX_NAMED],
                functions=["DistributedDataParallel reducer"],
            )
        ]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
