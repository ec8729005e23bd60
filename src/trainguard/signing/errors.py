"""Errors of the seal pillar.

Verification never returns False: it raises :class:`VerificationError`, which
carries every reason found (as findings), so a failure cannot be ignored and
the CLI can render the reasons like any scan report.
"""

from __future__ import annotations

from trainguard.errors import TrainguardError, UsageError
from trainguard.findings import Finding


class SealError(TrainguardError):
    """Sealing or verification could not be carried out (exit code 2)."""


class KeyLoadError(UsageError):
    """A key file is missing, unreadable, encrypted without a password or unsupported.

    Messages name the file and the reason only: never the key material.
    """


class VerificationError(TrainguardError):
    """The signature or the content it covers does not verify.

    ``findings`` lists every reason (bad signature, modified, added, removed,
    renamed or unsafe files), each with the rule id that explains it.
    """

    def __init__(self, message: str, findings: list[Finding]) -> None:
        super().__init__(message)
        self.findings = findings
