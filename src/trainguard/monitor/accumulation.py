"""Gradient accumulation: the gradient at the step is the SUM of what each backward gave.

The gradient factor (gradfactor.py) holds the pre-hook's gradient to one factor of
what backward left.  With accumulation backward runs several times per step, and
what it "left" was read after the last pass only: a gradient zeroed (or set to
None) after the first micro-batch, so that a quarter or half of every batch never
trains, left a last pass consistent with the step (red team 4, A16b).  The
invariant here is the sum: at each parameter's keyed sample elements,

* each pass's contribution is read where autograd hands it to the parameter (a
  tensor hook, before ``AccumulateGrad``) and ``p.grad`` after it was accumulated
  (the probe's post-accumulate hook); the gradient the step sees must then be one
  factor of ``first pass's p.grad + the later passes' contributions``.  A
  micro-batch's contribution scaled, dropped or replaced between passes breaks it
  (TG1306 through the factor judge);
* a pass that finds ``p.grad`` None or zero where the passes before it left a
  non-zero, finite gradient discarded them: TG1306 at that step, naming the pass.
  Resets are honest where a step boundary lies between the two passes: the
  optimizer's step (torch's closure API re-evaluates inside it: LBFGS), any watched
  optimizer's step hooks (a GAN's discriminator step between two backwards that reach
  the generator), ``guard.step`` (a step GradScaler skipped), and
  ``guard.outside_step()`` (a backward whose gradient the step does not use, as an
  adversarial-example pass: wrap it), and where what was discarded is not finite
  (a loop dropping an overflowed micro-batch);
* the first pass after a boundary must find ``p.grad`` None, zero, or what the last
  step's pre-hook saw (a loop that never zeroes): a gradient planted between
  ``zero_grad`` and backward is TG1306 too.

Cost: one more gather of the samples per parameter and backward (the contribution);
at the pre-hook a handful of vector operations over every pass at once and one
transfer, nothing at all for a run without accumulation whose ``zero_grad`` sets
gradients to None.  Distributed: each rank sums its own contributions and the probe
averages the sums across ranks, as it averages backward's samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_PASSES = 64  # passes kept per parameter between two pre-hooks; older ones are folded
MAX_NAMED = 5


@dataclass
class Pass:
    """One backward pass reaching one parameter, at its sample elements."""

    incoming: Any | None  # what autograd handed the parameter; None where unread
    was_none: bool  # p.grad was None before the pass accumulated
    after: Any  # p.grad after the pass
    fresh: bool  # the first pass since a step boundary (or one inside optimizer.step)
    weights: Any | None = None  # the parameter's samples when autograd reached it


class Passes:
    """The passes of one optimizer's parameters since its last pre-hook."""

    def __init__(self, torch: Any) -> None:
        self.torch = torch
        # Step boundaries seen, shared by every optimizer's probe (assembly.py): any
        # watched optimizer's step hooks separate two passes.
        self.marks = [0]
        self.nesting: Any = None  # the guard's StepNesting: depth > 0 inside optimizer.step
        self.reference: dict[int, Any] = {}  # float64 samples of p.grad at the last pre-hook
        self._last: dict[int, Any] = {}  # p.grad after a parameter's last pass
        self._incoming: dict[int, tuple[Any | None, bool, Any]] = {}
        self._passes: dict[int, list[Pass]] = {}
        self._seen: dict[int, int] = {}  # the mark at a parameter's last pass
        self._inside: dict[int, bool] = {}  # whether its last pass ran inside a step
        self._said: list[str] = []  # findings of folded passes, said at the next judge

    def boundary(self) -> None:
        self.marks[0] += 1

    def incoming(self, pid: int, sample: Any | None, was_none: bool, weights: Any) -> None:
        self._incoming[pid] = (sample, was_none, weights)

    def accumulated(self, pid: int, after: Any) -> None:
        nesting = self.nesting
        inside = nesting is not None and nesting.depth > 0
        mark = self.marks[0]
        fresh = inside or self._inside.get(pid, False) or self._seen.get(pid) != mark
        self._seen[pid], self._inside[pid] = mark, inside
        # A pass whose contribution we did not see (the tensor hook ran unarmed, or
        # autograd.grad captured one without accumulating) is a restart with no judgement.
        incoming, was_none, weights = self._incoming.pop(pid, (None, False, None))
        if incoming is not None and incoming.shape != after.shape:
            incoming = None
        passes = self._passes.setdefault(pid, [])
        passes.append(Pass(incoming, was_none, after, fresh, weights))
        if len(passes) > MAX_PASSES:
            self._fold(pid)

    def clear(self) -> None:
        self._passes.clear()
        self._incoming.clear()
        self._said.clear()

    def judge(self, names: dict[int, str]) -> tuple[dict[int, Any], str | None]:
        """Per parameter the sum the step's gradient must be a factor of (in the
        gradient's dtype), and what broke the accumulation, if anything."""
        passes, self._passes = self._passes, {}
        self._incoming.clear()
        found, self._said = self._said, []
        if not passes:
            return {}, _message(found)
        flags = _flags(self.torch, passes)
        starts: dict[int, int] = {}  # per parameter, the pass its sum starts from
        reset: dict[str, str] = {}  # the first pass each parameter's was dropped at
        planted: set[str] = set()
        for pid, ps in passes.items():
            name = names.get(pid, "?")
            start = 0
            for j, p in enumerate(ps):
                f = flags.get((pid, j))
                if p.fresh or j == 0:
                    start = j
                    # [differing, previous non-zero, previous non-finite, non-finite now]
                    last = ps[j - 1].after if j else self._last.get(pid)
                    if f is not None and f[0] > 0 and f[3] == 0 and not self._near(pid, p, last):
                        planted.add(name)
                    continue
                dropped = f is not None and f[1] > 0 and f[2] == 0
                if p.was_none or p.incoming is None or (f is not None and f[0] == 0):
                    # Onto None or zero: the passes before were dropped (unless they left
                    # nothing, or nothing finite); an unseen contribution restarts unjudged.
                    start = j
                    if dropped and (p.was_none or p.incoming is not None) and self._still(ps, j):
                        reset.setdefault(name, f"{name} (before pass {j + 1} of {len(ps)})")
            starts[pid] = start
            self._last[pid] = ps[-1].after
        if reset:
            found.append(
                f"the gradient accumulated over the step's backward passes was discarded "
                f"between two of them (zeroed or set to None; a backward whose gradient the "
                f"step does not use belongs in guard.outside_step()): "
                f"{_names(list(reset.values()))}"
            )
        if planted:
            found.append(
                f"the step's first backward accumulated onto a gradient that was neither "
                f"zero nor what the last step left: {_names(sorted(planted))}"
            )
        return _sums(self.torch, passes, starts), _message(found)

    def _still(self, ps: list[Pass], j: int) -> bool:
        """Whether pass ``j`` ran at the weights pass ``j - 1`` ran at.  A loop that moves
        the weights between two passes and drops the first's gradient is SAM (its ascent
        step; restoring the weights is the transient and tamper checks' business), not a
        dropped micro-batch."""
        a, b = ps[j].weights, ps[j - 1].weights
        if a is None or b is None or a.shape != b.shape:
            return True
        return bool(self.torch.equal(a, b))

    def _near(self, pid: int, p: Pass, last: Any) -> bool:
        """A first pass onto a gradient nobody zeroed: what the last pre-hook saw (a loop
        that never zeroes), or what the parameter's last pass left (a backward reaching
        another optimizer's parameters, which that optimizer zeroes later)."""
        torch = self.torch
        if p.incoming is None:
            return False
        after = p.after.to(torch.float64)
        incoming = p.incoming.to(torch.float64)
        # Rounding of one addition in the gradient's dtype (bfloat16: 2^-8).
        rtol = 2e-2 if p.after.element_size() < 4 else 1e-4
        for base in (self.reference.get(pid), last):
            if base is None or base.shape != after.shape:
                continue
            expected = base.to(torch.float64) + incoming
            if float((after - expected).norm()) <= rtol * float(expected.norm()):
                return True
        return False

    def _fold(self, pid: int) -> None:
        """Many passes without a pre-hook: judge them now, keep their sum as one pass."""
        others, self._passes = self._passes, {pid: self._passes[pid]}
        said, self._said = self._said, []
        last = self._passes[pid][-1]
        try:
            sums, found = self.judge({pid: "?"})
        finally:
            self._passes, self._said = others, said
        if found is not None:
            self._said.append(found)
        self._passes[pid] = [Pass(None, last.was_none, sums[pid], True)]


def _flags(torch: Any, passes: dict[int, list[Pass]]) -> dict[tuple[int, int], list[int]]:
    """For each pass to judge, counts over its samples: [elements where p.grad after it
    differs from its contribution (0: it accumulated onto zero), non-zero and
    non-finite elements the pass before left, non-finite elements now].  All passes in
    a few vector operations and one transfer."""
    keys: list[tuple[int, int]] = []
    cur: list[Any] = []
    inc: list[Any] = []
    prev: list[Any] = []
    for pid, ps in passes.items():
        for j, p in enumerate(ps):
            first = p.fresh or j == 0
            if first and (p.was_none or p.incoming is None):
                continue  # onto nothing, or unseen: nothing to judge
            if not first and p.incoming is None and not p.was_none:
                continue  # an unseen contribution: restarts unjudged
            keys.append((pid, j))
            cur.append(p.after)
            inc.append(p.incoming if p.incoming is not None else torch.zeros_like(p.after))
            prev.append(ps[j - 1].after if not first else torch.zeros_like(p.after))
    if not keys:
        return {}
    lengths = [int(t.numel()) for t in cur]
    a, g, b = torch.cat(cur), torch.cat(inc), torch.cat(prev)
    rows = torch.stack([a != g, b != 0, ~torch.isfinite(b), ~torch.isfinite(a)])
    ends = torch.tensor([0, *lengths], device=a.device).cumsum(0)
    total = torch.nn.functional.pad(rows.to(torch.int64).cumsum(1), (1, 0))
    counts = (total[:, ends[1:]] - total[:, ends[:-1]]).t().to("cpu").tolist()
    return dict(zip(keys, counts, strict=True))


def _sums(torch: Any, passes: dict[int, list[Pass]], starts: dict[int, int]) -> dict[int, Any]:
    """Per parameter: p.grad after its starting pass plus the later passes' contributions,
    added in the gradient's dtype in the order autograd added them (bit for bit in one
    process).  Parameters with the same passes are added together: a few operations
    for the whole model instead of a few per parameter."""
    groups: dict[tuple[int, int, Any], list[int]] = {}
    for pid, ps in passes.items():
        groups.setdefault((starts[pid], len(ps), ps[0].after.dtype), []).append(pid)
    sums: dict[int, Any] = {}
    for (start, count, _), pids in groups.items():
        if len(pids) == 1 or count - start == 1:
            for pid in pids:
                total = passes[pid][start].after
                for p in passes[pid][start + 1 :]:
                    total = total + p.incoming
                sums[pid] = total
            continue
        sizes = [int(passes[pid][start].after.numel()) for pid in pids]
        total = torch.cat([passes[pid][start].after for pid in pids])
        for j in range(start + 1, count):
            total = total + torch.cat([passes[pid][j].incoming for pid in pids])
        sums.update(zip(pids, total.split(sizes), strict=True))
    return sums


def _names(items: list[str]) -> str:
    more = f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else ""
    return ", ".join(items[:MAX_NAMED]) + more


def _message(found: list[str]) -> str | None:
    return "; ".join(found) if found else None
