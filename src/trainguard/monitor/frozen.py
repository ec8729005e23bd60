"""Parameters a loop froze mid-run on purpose, and that they stay frozen.

``p.requires_grad_(False)`` mid-run silently stops a layer from training, which is why
the parameter check calls it TG1301.  An honest loop that freezes a layer (the embedding
after N steps, a head-only phase) declares it at that step's ``guard.step``:
``changed=["0.weight.requires_grad"]`` names one parameter, ``changed=["requires_grad"]``
every parameter whose flag turned off.  The declaration is then verified: from that step
on, a declared parameter must not move at all (its version counter, storage and bits at
keyed elements stay as they were) until it is unfrozen again (gradual unfreezing is
recorded, checks/params.py).  A frozen parameter whose gradient is zero, not None, still
moves under momentum or weight decay: that is TG1301 too, since the layer is not frozen.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

ALL = "requires_grad"  # guard.step(changed=["requires_grad"]): every parameter that turned off
SUFFIX = ".requires_grad"
SAMPLES = 64


def declared(names: Mapping[str, Any]) -> tuple[bool, set[str]]:
    """From ``guard.step(changed=...)``: (all of them?, the parameters named)."""
    return ALL in names, {n[: -len(SUFFIX)] for n in names if n.endswith(SUFFIX)}


class Frozen:
    """The declared-frozen parameters and what they were when frozen."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[Any, int, int, Any, Any]] = {}
        self._seed = int.from_bytes(os.urandom(8), "little") & (2**62)

    def hold(self, name: str, p: Any) -> None:
        import torch

        data = p.detach()
        n = data.numel()
        gen = torch.Generator().manual_seed(self._seed ^ len(self.held))
        idx = torch.randint(0, max(n, 1), (min(SAMPLES, n),), generator=gen).to(data.device)
        sample = data.reshape(-1)[idx].clone()
        self.held[name] = (p, p._version, data.data_ptr(), idx, sample)

    def release(self, names: list[str]) -> None:
        """Unfrozen again (requires_grad back on): trained, and watched as such."""
        for n in names:
            self.held.pop(n, None)

    def thawed(self) -> list[str]:
        """The held parameters that require gradients again (unfrozen since they were
        held: trained from then on, released; the unfreeze is judged on its own)."""
        return [name for name, (p, *_) in self.held.items() if p.requires_grad]

    def moved(self) -> list[str]:
        """The held parameters written since they were frozen (each named once)."""
        out = []
        for name, (p, version, ptr, idx, sample) in list(self.held.items()):
            data = p.detach()
            same = p._version == version and data.data_ptr() == ptr
            if same and idx.numel():
                now = data.reshape(-1)[idx]
                same = bool(((now == sample) | (now.isnan() & sample.isnan())).all())
            if not same:
                out.append(name)
                del self.held[name]
        return out
