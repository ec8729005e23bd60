"""trainguard: stop, detect and explain sabotage of machine-learning training.

The public API.  Submodules are imported lazily so that ``import trainguard``
stays cheap and pulls in no optional dependency.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from trainguard._version import __version__
from trainguard.errors import (
    LimitExceeded,
    MissingExtraError,
    PolicyError,
    ScanError,
    TrainguardError,
    UnsafeModelError,
    UsageError,
)
from trainguard.findings import FileResult, Finding, ScanReport, Severity

if TYPE_CHECKING:
    from trainguard.loader import is_protected, load, unprotect
    from trainguard.loader.protect import protect
    from trainguard.monitor import Alert, Guard, TrainingStopped, watch
    from trainguard.scanner import Policy, scan, scan_bytes, scan_file
    from trainguard.signing import VerificationError, seal, verify

# The public names that live in the pillars, imported on first use so that
# ``trainguard scan`` does not pay for the loader, seal and watch (dataclass
# and regex set-up at import costs more than scanning a large checkpoint).
_LAZY: dict[str, str] = {
    "Alert": "trainguard.monitor",
    "Guard": "trainguard.monitor",
    "Policy": "trainguard.scanner",
    "TrainingStopped": "trainguard.monitor",
    "VerificationError": "trainguard.signing",
    "is_protected": "trainguard.loader",
    "load": "trainguard.loader",
    "protect": "trainguard.loader.protect",
    "scan": "trainguard.scanner",
    "scan_bytes": "trainguard.scanner",
    "scan_file": "trainguard.scanner",
    "seal": "trainguard.signing",
    "unprotect": "trainguard.loader",
    "verify": "trainguard.signing",
    "watch": "trainguard.monitor",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'trainguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Alert",
    "FileResult",
    "Finding",
    "Guard",
    "LimitExceeded",
    "MissingExtraError",
    "Policy",
    "PolicyError",
    "ScanError",
    "ScanReport",
    "Severity",
    "TrainguardError",
    "TrainingStopped",
    "UnsafeModelError",
    "UsageError",
    "VerificationError",
    "__version__",
    "is_protected",
    "load",
    "protect",
    "scan",
    "scan_bytes",
    "scan_file",
    "seal",
    "unprotect",
    "verify",
    "watch",
]


def _protect_from_environment() -> None:
    """``TRAINGUARD_PROTECT=block|warn|strict`` turns protect() on at import.

    For jobs launched by a scheduler: set the variable and import trainguard
    first (or run the job with ``python -m trainguard run``).
    """
    import os

    value = os.environ.get("TRAINGUARD_PROTECT", "").strip().lower()
    if value in ("", "0", "off", "no"):
        return
    if value not in ("1", "block", "warn", "strict", "on", "yes"):
        raise UsageError(f"TRAINGUARD_PROTECT={value!r}: use block, warn or strict")
    from trainguard.loader.protect import protect

    protect(mode="warn" if value == "warn" else "block", strict=value == "strict")


_protect_from_environment()
