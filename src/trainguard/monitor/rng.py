"""Random state: digests per step, and detection of re-seeding.

Legitimate training consumes randomness, so the states move every step; what
they never do is jump back to a state already seen (a re-seed to the same
seed) or change torch's recorded initial seed (any ``manual_seed`` call).
Seeding functions are also wrapped while a guard runs, so a call to them is
seen even when the seed is new.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from typing import Any


def _digest(obj: Any) -> str:
    h = hashlib.blake2b(digest_size=12)
    if hasattr(obj, "numpy"):
        h.update(obj.numpy().tobytes())
    elif isinstance(obj, tuple):
        for part in obj:
            h.update(repr(part).encode() if not hasattr(part, "tobytes") else part.tobytes())
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()


def state_digests() -> dict[str, str]:
    import torch

    out = {"torch": _digest(torch.get_rng_state()), "python": _digest(random.getstate())}
    try:
        import numpy as np

        out["numpy"] = _digest(np.random.get_state())
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        out["cuda"] = _digest(torch.cuda.get_rng_state())
    return out


def initial_seed() -> int:
    import torch

    return int(torch.initial_seed())


class SeedWatch:
    """Wraps the seeding functions while a run is watched; records each call."""

    TARGETS = (
        ("torch", "manual_seed"),
        ("torch.random", "manual_seed"),
        ("torch.cuda", "manual_seed"),
        ("torch.cuda", "manual_seed_all"),
        ("numpy.random", "seed"),
        ("random", "seed"),
    )

    def __init__(self, on_call: Callable[[str], None]) -> None:
        self.on_call = on_call
        self._originals: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        import importlib

        for module_name, attr in self.TARGETS:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            original = getattr(module, attr, None)
            if original is None or getattr(original, "__trainguard_seedwatch__", False):
                continue
            self._originals.append((module, attr, original))
            setattr(module, attr, self._wrap(f"{module_name}.{attr}", original))

    def _wrap(self, name: str, original: Any) -> Any:
        def seeded(*args: Any, **kwargs: Any) -> Any:
            self.on_call(f"{name}({', '.join(map(repr, args))})")
            return original(*args, **kwargs)

        seeded.__trainguard_seedwatch__ = True  # type: ignore[attr-defined]
        seeded.__wrapped__ = original  # type: ignore[attr-defined]
        return seeded

    def uninstall(self) -> None:
        for module, attr, original in reversed(self._originals):
            setattr(module, attr, original)
        self._originals.clear()


def generator_digest(generator: Any) -> str:
    """A digest of one private ``torch.Generator``'s state."""
    return _digest(generator.get_state())
