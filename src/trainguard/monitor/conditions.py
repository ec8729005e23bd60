"""What must be held equal for a training step to replay bit for bit.

The same code on the same data gives the same bits only under the same
conditions: the same torch (kernels change between releases), the same number
of intra-op threads (reductions split differently), the same determinism
flags, the same CPU instruction set that torch dispatches to, the same device.
A run records these at its start and at each checkpoint; ``trainguard replay``
records them again and reports any difference as the reason a replay is not
comparable, instead of calling a divergence sabotage.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Name -> what the text report calls it.
HELD: dict[str, str] = {
    "torch": "torch version",
    "python": "Python version",
    "numpy": "numpy version",
    "threads": "threads",
    "deterministic": "torch deterministic algorithms",
    "deterministic_warn_only": "deterministic warn-only",
    "cudnn_deterministic": "cudnn.deterministic",
    "cudnn_benchmark": "cudnn.benchmark",
    "matmul_precision": "float32 matmul precision",
    "cpu_capability": "CPU capability torch uses",
    "machine": "machine",
    "device": "device",
    "cuda": "CUDA version",
}


@dataclass(frozen=True)
class ConditionDiff:
    name: str
    recorded: Any
    replayed: Any

    def __str__(self) -> str:
        return f"{HELD.get(self.name, self.name)} {self.recorded} vs {self.replayed}"


def gather(model: Any = None) -> dict[str, Any]:
    """The conditions as they are now (``model``: where its parameters live)."""
    import torch

    out: dict[str, Any] = {
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cpu_capability": _cpu_capability(torch),
        "machine": platform.machine(),
        "cuda": None if torch.version.cuda is None else str(torch.version.cuda),
    }
    try:
        import numpy

        out["numpy"] = str(numpy.__version__)
    except ImportError:
        out["numpy"] = None
    if model is not None:
        out["device"] = _devices(model, torch)
    return out


def differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[ConditionDiff]:
    """Conditions recorded on both sides that differ (unknown ones are not guessed)."""
    return [
        ConditionDiff(name, recorded[name], now[name])
        for name in HELD
        if name in recorded and name in now and recorded[name] != now[name]
    ]


def hold(recorded: dict[str, Any]) -> tuple[list[str], Callable[[], None]]:
    """Set the conditions a process can set (threads, determinism) to the recorded ones.

    Returns what was changed, as text, and a function that puts them back.
    """
    import torch

    changed: list[str] = []
    undo: list[Callable[[], None]] = []
    threads = recorded.get("threads")
    if isinstance(threads, int) and threads > 0 and threads != torch.get_num_threads():
        old_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        changed.append(f"threads {old_threads} -> {threads}")
        undo.append(lambda: torch.set_num_threads(old_threads))
    det = recorded.get("deterministic")
    warn = bool(recorded.get("deterministic_warn_only", False))
    now_det = torch.are_deterministic_algorithms_enabled()
    now_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    if isinstance(det, bool) and (det, warn) != (now_det, now_warn):
        torch.use_deterministic_algorithms(det, warn_only=warn)
        changed.append(f"deterministic algorithms {now_det} -> {det}")
        undo.append(lambda: torch.use_deterministic_algorithms(now_det, warn_only=now_warn))

    def restore() -> None:
        for fn in reversed(undo):
            fn()

    return changed, restore


def _cpu_capability(torch: Any) -> str | None:
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return None


def _devices(model: Any, torch: Any) -> list[str]:
    seen: set[str] = set()
    for p in model.parameters():
        d = p.device
        if d.type == "cuda":
            seen.add(f"cuda ({torch.cuda.get_device_name(d)})")
        else:
            seen.add(d.type)
    return sorted(seen)
