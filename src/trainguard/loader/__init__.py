"""Loading without trusting: the safe loader, ``protect()`` and the load sandbox."""

from trainguard.loader.protect import is_protected, protect, unprotect
from trainguard.loader.safeload import load

__all__ = ["is_protected", "load", "protect", "unprotect"]
