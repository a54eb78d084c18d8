"""Reconnect back-off: exponential with full jitter (pure; the caller sleeps)."""

from __future__ import annotations

import random


class Backoff:
    """Delays of ``uniform(0, min(cap, base * 2**attempt))`` seconds.

    Full jitter spreads a fleet's reconnects over the whole window, so a broker restart is not
    followed by every device knocking at the same instant.
    """

    def __init__(self, base_s: float, cap_s: float, rng: random.Random | None = None) -> None:
        if not 0 < base_s <= cap_s:
            raise ValueError(f"need 0 < base_s <= cap_s, got {base_s} and {cap_s}")
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts one more failed attempt."""
        window = min(self.cap_s, self.base_s * 2.0 ** min(self.attempt, 62))
        self.attempt += 1
        return self._rng.uniform(0.0, window)

    def reset(self) -> None:
        """Call after a successful connection."""
        self.attempt = 0
