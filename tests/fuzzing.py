"""How long the property-based fuzz tests run.

``make test`` runs each fuzz test with its own modest example count.  A long
run (``bench/fuzz_long.sh``) sets ``TRAINGUARD_FUZZ_SCALE`` to multiply every
count, so that the same properties (no crash, no hang, no unbounded memory,
never a silent clean) are checked on far more inputs.
"""

from __future__ import annotations

import os


def fuzz_examples(count: int) -> int:
    scale = float(os.environ.get("TRAINGUARD_FUZZ_SCALE", "1") or 1)
    return max(1, int(count * scale))
