"""trainguard: stop, detect and explain sabotage of machine-learning training.

The public API.  Submodules are imported lazily so that ``import trainguard``
stays cheap and pulls in no optional dependency.
"""

from __future__ import annotations

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
from trainguard.load import is_protected, load, protect, unprotect
from trainguard.scan import Policy, scan, scan_bytes, scan_file

# Binds ``trainguard.seal`` to the function (as ``scan`` is): import the
# subpackage's modules with ``from trainguard.seal.x import y``.
from trainguard.seal import VerificationError, seal, verify
from trainguard.watch import Alert, Guard, TrainingStopped, watch

__version__ = "0.1.0"

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
    protect(mode="warn" if value == "warn" else "block", strict=value == "strict")


_protect_from_environment()
