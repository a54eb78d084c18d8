"""Distributed differential-privacy noise: each device of a secure-aggregation round adds its
share of the Gaussian noise (docs/privacy.md, "With secure aggregation").

The aggregator announces, in the round announcement's ``train`` map (the part the federation's
key signs), ``dp_clip_norm`` = ``C`` and ``dp_device_std`` = ``z·C/sqrt(m)`` for the quorum ``m``
(``min_updates``, also in the announcement). A device clips its delta to L2 norm ``C``, weighs
it 1 and adds ``N(0, dp_device_std²)`` to every coordinate before the fixed-point encoding, so the
unmasked sum of ``n >= m`` survivors carries ``N(0, n/m · (z·C)²)`` per coordinate: at least the
central noise.

Headroom: the fixed-point clip of such a round is ``C + TAIL_SIGMAS · dp_device_std``; a noised
coordinate beyond it is clipped by the encoding (probability about 2e-9 per coordinate at six
sigma). Devices refuse a roster whose clip is tighter than that.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedmq.secagg.fixedpoint import FixedPoint

F64 = npt.NDArray[np.float64]

#: The announcement's ``train`` keys.
CLIP_KEY = "dp_clip_norm"
STD_KEY = "dp_device_std"
#: How many device-noise standard deviations the fixed-point clip leaves above ``C``.
TAIL_SIGMAS = 6.0


def device_std(noise_multiplier: float, clip_norm: float, quorum: int) -> float:
    """One device's share: ``z·C/sqrt(m)``, so ``m`` shares sum to ``N(0, (z·C)²)``."""
    return noise_multiplier * clip_norm / math.sqrt(quorum)


def announced(noise_multiplier: float, clip_norm: float, quorum: int) -> dict[str, float]:
    """The announcement's ``train`` entries for a round with distributed noise."""
    return {CLIP_KEY: clip_norm, STD_KEY: device_std(noise_multiplier, clip_norm, quorum)}


def fixed_clip(clip_norm: float, std: float) -> float:
    """The fixed-point clip that leaves room for a clipped delta plus its noise."""
    return clip_norm + TAIL_SIGMAS * std


def ring_error(noise_multiplier: float, clip_norm: float, quorum: int, max_devices: int) -> str:
    """Why ``max_devices`` clipped, noised values overflow the 32-bit ring ('' if they fit)."""
    bound = fixed_clip(clip_norm, device_std(noise_multiplier, clip_norm, quorum))
    try:
        FixedPoint.for_devices(max_devices, bound, 1.0)
    except ValueError:
        return (f"{max_devices} devices' noised values (up to {bound:.4g}) overflow the 32-bit "
                "ring")
    return ""


@dataclass(frozen=True, slots=True)
class DeviceNoise:
    """What a device adds: clip to ``clip_norm``, then ``N(0, std²)`` per coordinate; and the
    fewest survivors (``quorum``) whose sum it agrees to have unmasked."""

    clip_norm: float
    std: float
    quorum: int

    @classmethod
    def from_train(cls, train: Mapping[str, object], quorum: int) -> DeviceNoise | None:
        """The announced noise, None without it; ValueError for values that make no sense."""
        if CLIP_KEY not in train and STD_KEY not in train:
            return None
        clip, std = train.get(CLIP_KEY), train.get(STD_KEY)
        for key, v in ((CLIP_KEY, clip), (STD_KEY, std)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not (
                    math.isfinite(v) and v > 0):
                raise ValueError(f"announcement train {key!r} must be a number > 0, got {v!r}")
        assert isinstance(clip, int | float)
        assert isinstance(std, int | float)
        return cls(float(clip), float(std), max(1, quorum))

    @property
    def bound(self) -> float:
        return fixed_clip(self.clip_norm, self.std)

    def apply(self, values: F64, rng: np.random.Generator | None = None) -> F64:
        """``values`` clipped to L2 norm ``clip_norm`` plus fresh noise (a new array). The
        default generator is seeded from ``os.urandom``: the server cannot redraw it."""
        if rng is None:
            rng = np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32), "big")))
        x = np.nan_to_num(np.asarray(values, dtype=np.float64).ravel(), nan=0.0,
                          posinf=0.0, neginf=0.0)
        norm = float(np.linalg.norm(x))
        if norm > self.clip_norm:
            x = x * (self.clip_norm / norm)
        out: F64 = rng.standard_normal(x.size)
        out *= self.std
        out += x
        return out
