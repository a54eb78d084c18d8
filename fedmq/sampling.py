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

Redraws: a round extended below its quorum is announced again with ``sample_draw`` = k (one more
per extension). Draw ``j`` >= 1 uses the key ``f"{seed}:{round}:{device_id}:{j}"``; a device takes
part if draw 0 *or any later draw up to k* selects it, so an extension only adds devices to the
sample and never drops one (a sample that was empty, or below the quorum, grows instead of being
drawn the same again for ever).
"""

from __future__ import annotations

import hashlib

_BITS = 53  # the precision of a double: the draw is exact in every language


def uniform(seed: int, round: int, device_id: str, draw: int = 0) -> float:
    """The device's draw in [0, 1) for this round (steps 1-4 of the recipe above)."""
    key = f"{seed}:{round}:{device_id}" + (f":{draw}" if draw else "")
    digest = hashlib.sha256(key.encode()).digest()
    return (int.from_bytes(digest[:8], "big") >> (64 - _BITS)) / 2.0**_BITS


def selected(seed: int, round: int, device_id: str, rate: float, draws: int = 0) -> bool:
    """Whether ``device_id`` takes part in ``round`` when a fraction ``rate`` of devices should,
    after ``draws`` redraws of the sample (any of draws 0..draws selects it)."""
    if not 0.0 <= rate <= 1.0:  # also refuses NaN
        raise ValueError(f"sample rate must be in [0, 1], got {rate!r}")
    if rate >= 1.0:
        return True
    return any(uniform(seed, round, device_id, j) < rate for j in range(draws + 1))
