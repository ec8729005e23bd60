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
Cost: 8 parameters per step, drawn with the run's key (the same on every
rank), 8 elements each: two small gathers per drawn parameter per synced backward,
one all-reduce of at most 200 numbers per step; every parameter's hook is still a
Python call per backward (100 Linear layers on CPU, load ~4: 0.4 to 1.3 ms per step
of 22-25 ms, noisy).  A change to one parameter among many is found at a step that
draws it.
"""

from __future__ import annotations

from typing import Any

from trainguard.findings import Severity
from trainguard.monitor.alerts import Alert, Context
from trainguard.monitor.checks.base import Check
from trainguard.monitor.forwards import ForwardWatch
from trainguard.monitor.safety import compile_safe

SAMPLES = 8  # keyed elements per parameter
PER_STEP = 8  # parameters read per step (keyed draw): the cost stays flat in the model's size
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
        # The parameters read at each step: a keyed draw of PER_STEP, the same on every rank
        # (the key is the run's; steps are counted here, every rank steps together).
        self._seed = int.from_bytes(key[24:32], "little")
        self._gen = torch.Generator()
        self._step = 0
        self._now = self._draw()
        self.local: dict[int, Any] = {}
        self.reduced: dict[int, Any] = {}
        self._queued = False
        self._synced = True  # the DDP sync flag the last forward with gradients saw
        if self.ddps:
            forwards.starts.append(self._forward)

    def _draw(self) -> frozenset[int]:
        count = len(self.params)
        if count <= PER_STEP:
            return frozenset(range(count))
        self._gen.manual_seed((self._seed ^ self._step) & (2**62))
        return frozenset(self.torch.randperm(count, generator=self._gen)[:PER_STEP].tolist())

    def _forward(self, grad: bool) -> None:
        if grad:
            self._synced = all(getattr(m, "require_backward_grad_sync", True) for m in self.ddps)

    def _local(self, p: Any) -> None:
        i = self.index.get(id(p))
        if i is None or i not in self._now or p.grad is None or not self._synced:
            return
        # A copy (the gather): the reducer overwrites a bucket view in place.
        self.local[i] = p.grad.detach().reshape(-1)[self.params[i][3]]
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
                self.reduced[i] = p.grad.detach().reshape(-1)[idx]

    def before_step(self, ctx: Context) -> list[Alert]:
        if not self.params:
            return []
        local, reduced, now = self.local, self.reduced, self._now
        self.local, self.reduced = {}, {}
        self._step += 1
        self._now = self._draw()
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return []
        bad: list[str] = []
        for m in self.ddps:
            bad += self._compare(m, now, local, reduced, dist)
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

    def _compare(
        self, m: Any, now: frozenset[int], local: dict[int, Any], reduced: dict[int, Any], dist: Any
    ) -> list[str]:
        """Names of ``m``'s parameters whose reduced samples are not the ranks' mean: one
        all_reduce and one transfer for all of them."""
        torch = self.torch
        mine = [i for i, (d, _, _, _) in enumerate(self.params) if d is m and i in now]
        if not mine:
            return []
        f64 = torch.float64
        device = self.params[mine[0]][3].device
        # Every rank sends the same shape: zeros where it read nothing, and a count.
        loc, red, count = [], [], []
        for i in mine:
            n = int(self.params[i][3].numel())
            z = torch.zeros(n, dtype=f64, device=device)
            got = i in local and i in reduced
            loc.append(local[i].to(f64) if got else z)
            red.append(reduced[i].to(f64) if got else z)
            count.append(1.0 if got else 0.0)
        locs = torch.cat(loc)
        flat = torch.cat([locs, locs.abs(), torch.tensor(count, dtype=f64, device=device)])
        group = getattr(m, "process_group", None)
        world = dist.get_world_size(group)
        if world > 1:
            dist.all_reduce(flat, group=group)
        total = int(locs.numel())
        mean, scale = flat[:total] / world, flat[total : 2 * total] / world
        off = (torch.cat(red) - mean).abs() > RTOL * scale + 1e-30
        sizes = [int(t.numel()) for t in loc]
        per = torch.stack([part.any() for part in off.split(sizes)])
        seen = flat[2 * total :] == world
        flagged = (per & seen).to("cpu").tolist()  # one transfer
        return [self.params[i][1] for i, f in zip(mine, flagged, strict=True) if f]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
