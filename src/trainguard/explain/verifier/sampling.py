"""Which segments the verifier recomputes, and what that buys.

The choice is keyed: segment ``[a, b)`` of run ``R`` is picked when
``HMAC-SHA256(secret, R, a)``, read as a number in [0, 1), is below the rate
``p``.  Without the secret (the verifier's own, never given to training) the
training process cannot tell which segments will be recomputed, so sabotage
that wants to survive must avoid every segment, and each segment it is active
in is caught with probability ``p``, independently.

With sabotage active in a fraction ``f`` of ``n`` segments so far, ``k = f n``
of them were exposed, and the chance that at least one was picked is
``1 - (1 - p) ** k`` (:func:`detection_probability`).
"""

from __future__ import annotations

import hashlib
import hmac
import math

DEFAULT_RATE = 0.05  # a few percent of extra compute (docs/verifier.md)
SECRET_BYTES = 32
_DOMAIN = b"trainguard-verifier-sampling/1"


def secret_from(material: bytes) -> bytes:
    """The sampling secret derived from the verifier's own key material."""
    return hmac.new(material, _DOMAIN, hashlib.sha256).digest()


def draw(secret: bytes, run_id: str, start: int) -> float:
    """The keyed draw in [0, 1) of the segment starting at ``start``."""
    message = run_id.encode() + b"\0" + str(start).encode()
    value = int.from_bytes(hmac.new(secret, message, hashlib.sha256).digest()[:8], "big")
    return value / 2.0**64


def chosen(secret: bytes, run_id: str, start: int, rate: float) -> bool:
    return draw(secret, run_id, start) < rate


def detection_probability(rate: float, fraction: float, segments: int) -> float:
    """P(at least one of the ``fraction * segments`` sabotaged segments was picked)."""
    if not 0.0 <= rate <= 1.0 or not 0.0 <= fraction <= 1.0 or segments < 0:
        raise ValueError("rate and fraction are in [0, 1], segments is not negative")
    exposed = fraction * segments
    if rate >= 1.0:
        return 1.0 if exposed > 0 else 0.0
    return -math.expm1(exposed * math.log1p(-rate))
