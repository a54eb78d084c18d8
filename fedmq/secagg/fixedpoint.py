"""A weighted update as integers mod 2^32, so masks drawn uniformly from the ring hide it.

A device sends ``q = round(2^f * clip(w' * x, -c, c))`` for every parameter ``x`` of its update,
followed by one more element ``round(2^f * w')``: the weight, so the server learns only the sum
of the weights, never one of them. ``w' = min(w / weight_cap, 1)`` is the device's weight
normalised by the round's ``weight_cap`` (the weight is applied before masking: the server cannot
apply it afterwards). Values are two's complement in uint32.

Headroom: the sum of ``n`` devices' elements lies in ``[-n * 2^f * m - n/2, n * 2^f * m + n/2]``
with ``m = max(c, 1)`` (the weight element is at most ``2^f``); it is exact as long as that stays
inside the signed 32-bit range, so ``frac_bits`` is the largest ``f`` with
``n * (2^f * m + 1/2) <= 2^31 - 1`` for ``n = max_devices``. With ``c = 4``: ``f = 22``
(resolution 2.4e-7) for 100 devices, ``f = 15`` for 10,000. Each device's rounding error is at
most ``2^-(f+1)`` per element, so the mean's error is below ``2^-(f+1) / sum(w')`` times ``n``:
well under float32 resolution of a typical update at these sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

U32 = npt.NDArray[np.uint32]
F64 = npt.NDArray[np.float64]

RING_BITS = 32
_SIGNED_MAX = (1 << (RING_BITS - 1)) - 1


@dataclass(frozen=True, slots=True)
class FixedPoint:
    """The round's encoding: ``frac_bits`` fractional bits, values clipped to ``[-clip, clip]``,
    weights divided by ``weight_cap``."""

    frac_bits: int
    clip: float
    weight_cap: float

    def __post_init__(self) -> None:
        if not 0 <= self.frac_bits <= 30:
            raise ValueError(f"frac_bits must be in [0, 30]; got {self.frac_bits}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"clip must be finite and > 0; got {self.clip!r}")
        if not (math.isfinite(self.weight_cap) and self.weight_cap > 0):
            raise ValueError(f"weight_cap must be finite and > 0; got {self.weight_cap!r}")

    @classmethod
    def for_devices(cls, max_devices: int, clip: float, weight_cap: float) -> FixedPoint:
        """The finest encoding whose sum over ``max_devices`` devices cannot wrap."""
        if max_devices < 1:
            raise ValueError(f"max_devices must be >= 1; got {max_devices}")
        m = max(clip, 1.0)
        f = 30
        while f > 0 and max_devices * (2.0**f * m + 0.5) > _SIGNED_MAX:
            f -= 1
        if max_devices * (2.0**f * m + 0.5) > _SIGNED_MAX:
            raise ValueError(f"{max_devices} devices with clip {clip} overflow a 32-bit ring")
        return cls(f, clip, weight_cap)

    def max_devices(self) -> int:
        """How many devices' elements can be summed without wrapping."""
        return int(_SIGNED_MAX // (2.0**self.frac_bits * max(self.clip, 1.0) + 0.5))

    def norm_weight(self, weight: float) -> float:
        """``w' = min(w / weight_cap, 1)``, 0 for a weight that is not finite and positive."""
        if not (math.isfinite(weight) and weight > 0):
            return 0.0
        return min(weight / self.weight_cap, 1.0)

    def encode(self, values: npt.ArrayLike, weight: float) -> U32:
        """The ring vector of one update: weighted, clipped, scaled values, then the weight."""
        w = self.norm_weight(weight)
        x = np.asarray(values, dtype=np.float64).ravel()
        x = np.nan_to_num(x, nan=0.0, posinf=self.clip, neginf=-self.clip)
        v = np.clip(x * w, -self.clip, self.clip)
        out = np.empty(x.size + 1, dtype=np.int64)
        np.rint(v * 2.0**self.frac_bits, out=out[:-1], casting="unsafe")
        out[-1] = round(w * 2.0**self.frac_bits)
        return (out & 0xFFFFFFFF).astype(np.uint32)

    def decode_sum(self, total: U32) -> tuple[F64, float]:
        """``(sum of w' * x, sum of w')`` from the ring sum of the devices' vectors."""
        signed = np.ascontiguousarray(total, dtype=np.uint32).view(np.int32).astype(np.float64)
        scale = 2.0**-self.frac_bits
        return signed[:-1] * scale, float(signed[-1]) * scale


def ring_sum(vectors: list[U32]) -> U32:
    """The plain sum mod 2^32 (numpy's uint32 addition wraps): the reference for tests."""
    acc = np.zeros_like(vectors[0])
    for v in vectors:
        acc += v
    return acc
