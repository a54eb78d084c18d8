"""Numpy references for the server optimizers, written from the papers' equations.

Independent of ``aggregator.strategies``: per tensor, in float64, everything at once.

The round's pseudo-gradient is the weighted mean delta ``Δ = Σ wᵢ·sᵢ·Δᵢ / Σ wᵢ`` (``sᵢ`` the
norm bound's clip factor of update ``i``: it scales the update, not its weight). Then, with η the
server learning rate:

- FedAvg (McMahan et al. 2017): ``x ← x + η·Δ``.
- FedAvgM (Hsu et al. 2019): ``m ← β·m + Δ``; ``x ← x + η·m``; ``m`` starts at 0.
- Reddi et al. 2021, Algorithm 2 (FedAdagrad, FedAdam, FedYogi)::

      m ← β1·m + (1 - β1)·Δ
      v ← v + Δ²                              (Adagrad)
      v ← β2·v + (1 - β2)·Δ²                  (Adam)
      v ← v - (1 - β2)·Δ²·sign(v - Δ²)        (Yogi)
      x ← x + η·m / (√v + τ)

  with ``m₋₁ = 0`` and ``v₋₁ = τ²`` (the paper asks for ``v₋₁ ≥ τ²``), no bias correction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


def mean_delta(updates: Sequence[Mapping[str, F32]], weights: Sequence[float],
               scales: Sequence[float]) -> dict[str, F64]:
    """``Σ wᵢ·sᵢ·Δᵢ / Σ wᵢ`` per tensor, in float64."""
    total = sum(weights)
    out: dict[str, F64] = {}
    for name in updates[0]:
        acc = np.zeros(updates[0][name].shape, np.float64)
        for u, w, s in zip(updates, weights, scales, strict=True):
            acc = acc + (w * s) * u[name].astype(np.float64)
        out[name] = acc / total
    return out


@dataclass
class ServerOptimizer:
    """One strategy's state across rounds; ``step`` applies one round."""

    name: str
    server_lr: float
    momentum: float = 0.0
    beta1: float = 0.0
    beta2: float = 0.0
    tau: float = 1.0
    m: dict[str, F64] = field(default_factory=dict, init=False)
    v: dict[str, F64] = field(default_factory=dict, init=False)

    def step(self, base: Mapping[str, F32], delta: Mapping[str, F64]) -> dict[str, F64]:
        """The new model in float64 (before the float32 rounding) from ``base`` and Δ."""
        lr, new = self.server_lr, {}
        for name, x in base.items():
            x64, d = x.astype(np.float64), delta[name]
            if self.name == "fedavg":
                new[name] = x64 + lr * d
                continue
            m = self.m.get(name, np.zeros_like(d))
            if self.name == "fedavgm":
                self.m[name] = m = self.momentum * m + d
                new[name] = x64 + lr * m
                continue
            v = self.v.get(name, np.full_like(d, self.tau**2))
            m = self.beta1 * m + (1 - self.beta1) * d
            if self.name == "fedadagrad":
                v = v + d**2
            elif self.name == "fedadam":
                v = self.beta2 * v + (1 - self.beta2) * d**2
            elif self.name == "fedyogi":
                v = v - (1 - self.beta2) * d**2 * np.sign(v - d**2)
            else:
                raise ValueError(f"no reference for {self.name!r}")
            self.m[name], self.v[name] = m, v
            new[name] = x64 + lr * m / (np.sqrt(v) + self.tau)
        return new
