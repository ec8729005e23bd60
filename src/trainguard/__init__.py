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
    UsageError,
)
from trainguard.findings import FileResult, Finding, ScanReport, Severity
from trainguard.scan import Policy, scan, scan_bytes, scan_file

__version__ = "0.1.0"

__all__ = [
    "FileResult",
    "Finding",
    "LimitExceeded",
    "MissingExtraError",
    "Policy",
    "PolicyError",
    "ScanError",
    "ScanReport",
    "Severity",
    "TrainguardError",
    "UsageError",
    "__version__",
    "scan",
    "scan_bytes",
    "scan_file",
]
