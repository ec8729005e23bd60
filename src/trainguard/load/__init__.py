"""Loading without trusting: the safe loader, ``protect()`` and the load sandbox."""

from trainguard.load.loader import load
from trainguard.load.protect import is_protected, protect, unprotect

__all__ = ["is_protected", "load", "protect", "unprotect"]
