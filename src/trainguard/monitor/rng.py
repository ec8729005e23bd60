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
    """Wraps the seeding functions while a run is watched; records each call.

    One wrapper per function for the whole process, carrying the list of watches that
    listen to it: a second guard joins the wrapper it finds instead of leaving it be (a
    guard never closed, or one whose checks were tampered with so its close never ran,
    once left the wrapper feeding only its own dead list: every later guard in the
    process was blind to seeding calls).  The last watch to leave puts the original back.
    """

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
        self._joined: list[tuple[Any, str, Any]] = []  # (module, name, wrapper)

    def install(self) -> None:
        import importlib

        for module_name, attr in self.TARGETS:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            current = getattr(module, attr, None)
            if current is None:
                continue
            if not isinstance(getattr(current, "__trainguard_seedwatch__", None), list):
                current = _wrap(f"{module_name}.{attr}", current)
                setattr(module, attr, current)
            current.__trainguard_seedwatch__.append(self.on_call)
            self._joined.append((module, attr, current))

    def uninstall(self) -> None:
        for module, attr, wrapper in reversed(self._joined):
            listeners = wrapper.__trainguard_seedwatch__
            if self.on_call in listeners:
                listeners.remove(self.on_call)
            original = wrapper.__wrapped__
            if not listeners and getattr(module, attr, None) is wrapper:
                setattr(module, attr, original)
        self._joined.clear()


def _wrap(name: str, original: Any) -> Any:
    listeners: list[Callable[[str], None]] = []

    def seeded(*args: Any, **kwargs: Any) -> Any:
        call = f"{name}({', '.join(map(repr, args))})"
        for listener in list(listeners):
            listener(call)
        return original(*args, **kwargs)

    seeded.__trainguard_seedwatch__ = listeners  # type: ignore[attr-defined]
    seeded.__wrapped__ = original  # type: ignore[attr-defined]
    return seeded


def generator_digest(generator: Any) -> str:
    """A digest of one private ``torch.Generator``'s state."""
    return _digest(generator.get_state())
