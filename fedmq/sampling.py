"""Server-free device selection: each device decides from the round announcement's seed and rate.

The recipe, byte for byte, so a device in any language gets the same answer:

1. ``key = f"{seed}:{round}:{device_id}"`` encoded as UTF-8; ``seed`` and ``round`` in plain
   decimal (a leading ``-`` if negative, no padding, no ``+``). Neither number can contain ``:``,
   so a ``device_id`` that does stays unambiguous.
2. ``digest = SHA-256(key)``.
3. ``x = `` the first 8 bytes of ``digest`` as an unsigned big-endian integer, shifted right by 11
   bits (keeping the top 53 bits).
4. ``u = x / 2**53``: a uniform draw in [0, 1). Any 53-bit integer divided by 2**53 is exact in an
   IEEE-754 double, so C, Java or JavaScript compute the same ``u`` with no rounding.
5. The device is selected iff ``u < rate``: ``rate == 1.0`` always selects, ``0.0`` never does.
"""

from __future__ import annotations

import hashlib

_BITS = 53  # the precision of a double: the draw is exact in every language


def uniform(seed: int, round: int, device_id: str) -> float:
    """The device's draw in [0, 1) for this round (steps 1-4 of the recipe above)."""
    digest = hashlib.sha256(f"{seed}:{round}:{device_id}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> (64 - _BITS)) / 2.0**_BITS


def selected(seed: int, round: int, device_id: str, rate: float) -> bool:
    """Whether ``device_id`` takes part in ``round`` when a fraction ``rate`` of devices should."""
    if not 0.0 <= rate <= 1.0:  # also refuses NaN
        raise ValueError(f"sample rate must be in [0, 1], got {rate!r}")
    return uniform(seed, round, device_id) < rate
