"""Federated averaging, plain (McMahan et al. 2017) and with server momentum (FedAvgM).

With Δ the round's weighted mean delta (``Σ w·Δᵢ / Σ w``) and η ``server_lr``:

- FedAvg: ``x ← x + η·Δ``.
- FedAvgM: ``m ← β·m + Δ`` then ``x ← x + η·m`` (Hsu et al. 2019; Flower's ``FedAvgM``, whose
  first round's momentum is Δ itself, the same as starting from ``m = 0``).
"""

from __future__ import annotations

import numpy as np

from aggregator.spec import ModelSpec
from aggregator.strategies.base import F64, StreamingFold, _fraction

__all__ = ["FedAvg", "FedAvgM"]


class FedAvg(StreamingFold):
    """Federated averaging: ``base + server_lr · Σ w·Δ / Σ w``. ``server_lr = 1`` is plain
    FedAvg."""

    name = "fedavg"

    def __init__(self, spec: ModelSpec, server_lr: float = 1.0) -> None:
        super().__init__(spec, server_lr)

    def _step(self, delta: F64) -> tuple[F64, dict[str, F64]]:
        delta *= self.server_lr
        delta += self._base
        return delta, {}


class FedAvgM(StreamingFold):
    """FedAvg with server momentum: ``m ← momentum·m + Δ``, ``base + server_lr·m``."""

    name = "fedavgm"

    def __init__(self, spec: ModelSpec, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__(spec, server_lr)
        self.momentum = _fraction("momentum", momentum)
        self._state = {"m": np.zeros(spec.total, dtype=np.float64)}

    def describe(self) -> str:
        return f"{self.name} (server_lr {self.server_lr:g}, momentum {self.momentum:g})"

    def _step(self, delta: F64) -> tuple[F64, dict[str, F64]]:
        m = self._state["m"] * self.momentum  # a new array: the committed one stays as it was
        m += delta
        np.multiply(m, self.server_lr, out=delta)
        delta += self._base
        return delta, {"m": m}
