"""Loading without trusting: the safe loader, ``protect()`` and the load sandbox.

``protect()`` itself is ``trainguard.protect`` (or ``trainguard.loader.protect.protect``):
re-exported here under its own name it would shadow the submodule ``protect``, and
``import trainguard.loader.protect as p`` would give the function.
"""

from trainguard.loader.protect import is_protected, unprotect
from trainguard.loader.safeload import load

__all__ = ["is_protected", "load", "unprotect"]
