"""Static analysis of model files: content in, findings out; nothing is ever executed."""

from trainguard.scanner.engine import scan, scan_bytes, scan_file
from trainguard.scanner.policy import Policy

__all__ = ["Policy", "scan", "scan_bytes", "scan_file"]
