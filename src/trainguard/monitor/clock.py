"""The guard's clock: references to the time functions taken when trainguard is imported.

Code that patches ``time.perf_counter`` (to hide a sleep, or to make every
step look equally fast in the ledger) after this module is imported does not
change what the guard reads.  :func:`patched` says whether the module-level
functions still are the ones captured here, so a guard reports the patch
(TG1304) instead of silently trusting or distrusting it.
"""

from __future__ import annotations

import time

# Captured once, at import: the guard never looks these names up again.
_PERF_COUNTER = time.perf_counter
_MONOTONIC = time.monotonic
_CAPTURED = {"time.perf_counter": _PERF_COUNTER, "time.monotonic": _MONOTONIC}


def now() -> float:
    """Seconds from the performance counter captured at import."""
    return _PERF_COUNTER()


def patched() -> list[str]:
    """The time functions whose module attribute is no longer the one captured at import."""
    return [name for name, fn in _CAPTURED.items() if getattr(time, name[5:]) is not fn]
