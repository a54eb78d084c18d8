"""Slow, obvious numpy references for the aggregator kernels and strategies.

Everything at once, in float64, with the numpy function whose meaning nobody has to think about.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def weighted_mean(updates: Sequence[F32], weights: Sequence[float]) -> F64:
    """``np.average`` over all updates stacked, in float64."""
    stacked = np.stack([np.asarray(u, dtype=np.float64) for u in updates])
    mean: F64 = np.average(stacked, axis=0, weights=np.asarray(weights, dtype=np.float64))
    return mean


def fedavg(
    base: Mapping[str, F32],
    updates: Sequence[Mapping[str, F32]],
    weights: Sequence[float],
    server_lr: float = 1.0,
) -> dict[str, F64]:
    """``base + server_lr * weighted mean of the deltas``, per tensor, in float64."""
    return {
        name: b.astype(np.float64) + server_lr * weighted_mean([u[name] for u in updates], weights)
        for name, b in base.items()
    }


def sq_norm(x: F32) -> float:
    """Sum of squares in float64."""
    return float(np.sum(np.square(x.astype(np.float64))))


def lane_sq_norm(x: npt.ArrayLike) -> float:
    """Sum of squares in float64 in the kernels' order, to the bit: eight lanes (element i in
    lane i % 8, each summed in order), combined as ((0+1)+(2+3))+((4+5)+(6+7))."""
    sq = np.square(np.asarray(x, np.float64).ravel())
    s = [float(np.add.accumulate(sq[j::8])[-1]) if sq[j::8].size else 0.0 for j in range(8)]
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))


def all_finite(x: F32) -> bool:
    """No NaN and no infinity."""
    return bool(np.isfinite(x).all())
