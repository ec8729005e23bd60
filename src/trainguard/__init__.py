"""trainguard: stop, detect and explain sabotage of machine-learning training.

The public API.  Submodules are imported lazily so that ``import trainguard``
stays cheap and pulls in no optional dependency.
"""

from __future__ import annotations

import importlib
import sys
import types
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
    from trainguard.load import is_protected, load, protect, unprotect
    from trainguard.scan import Policy, scan, scan_bytes, scan_file
    from trainguard.seal import VerificationError, seal, verify
    from trainguard.watch import Alert, Guard, TrainingStopped, watch

# The public names that live in the pillars, imported on first use so that
# ``trainguard scan`` does not pay for the loader, seal and watch (dataclass
# and regex set-up at import costs more than scanning a large checkpoint).
_LAZY: dict[str, str] = {
    "Alert": "trainguard.watch",
    "Guard": "trainguard.watch",
    "Policy": "trainguard.scan",
    "TrainingStopped": "trainguard.watch",
    "VerificationError": "trainguard.seal",
    "is_protected": "trainguard.load",
    "load": "trainguard.load",
    "protect": "trainguard.load",
    "scan": "trainguard.scan",
    "scan_bytes": "trainguard.scan",
    "scan_file": "trainguard.scan",
    "seal": "trainguard.seal",
    "unprotect": "trainguard.load",
    "verify": "trainguard.seal",
    "watch": "trainguard.watch",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'trainguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _Package(types.ModuleType):
    """Keeps ``trainguard.scan``/``load``/``seal``/``watch`` the public functions.

    Importing a subpackage makes Python bind it as an attribute of its parent,
    which would shadow the function of the same name (``trainguard.watch``
    would become a module, not callable).  The subpackage stays reachable
    through ``sys.modules`` and ``from trainguard.watch import guard``.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

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
    from trainguard.load import protect

    protect(mode="warn" if value == "warn" else "block", strict=value == "strict")


_protect_from_environment()
