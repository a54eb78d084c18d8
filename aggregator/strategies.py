"""Aggregation strategies: streaming ``init / fold / finalize`` over a round's updates.

A strategy never holds a list of updates: each one is folded into a flat float64 accumulator
(``Σ w·x``) the moment it arrives, so memory is O(params) whatever the number of devices.
Folding runs through ``aggregator.kernels`` (this module does not import numba).

Order independence is up to float64 rounding: every add rounds at about 1e-16 relative, far below
float32 resolution, so the float32 model is the same whatever the arrival order except when a
value lies within that margin of a float32 rounding boundary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from aggregator.kernels import KERNELS, all_finite_fp32
from aggregator.spec import ModelSpec
from fedmq.errors import ProtocolError
from fedmq.wire import Tensor

__all__ = ["FedAvg", "PartialSum", "Strategy"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclass
class PartialSum:
    """A mergeable round state: ``Σ w·x`` over the flat model, ``Σ w``, and how many updates.

    ``merge`` is associative and commutative (up to float64 rounding) and ``zero`` is its
    identity, so sums can be combined in any grouping: aggregator workers each fold a share of the
    updates and a coordinator merges their partials (scale-out), and an edge gateway forwards one
    partial for its whole site (hierarchies). Both are the same code.
    """

    weighted_sum: F64
    total_weight: float
    contributors: int

    def __post_init__(self) -> None:
        ws = self.weighted_sum
        if not isinstance(ws, np.ndarray) or ws.dtype != np.float64 or ws.ndim != 1:
            raise ValueError("weighted_sum must be a 1-D float64 array")
        if not math.isfinite(self.total_weight) or self.total_weight < 0:
            raise ValueError(f"total_weight must be finite and >= 0; got {self.total_weight!r}")
        if self.contributors < 0:
            raise ValueError(f"contributors must be >= 0; got {self.contributors}")

    @classmethod
    def zero(cls, size: int) -> PartialSum:
        """The empty sum over ``size`` parameters."""
        return cls(np.zeros(size, dtype=np.float64), 0.0, 0)

    def merge(self, other: PartialSum) -> PartialSum:
        """A new partial sum holding both; neither input is modified."""
        if other.weighted_sum.shape != self.weighted_sum.shape:
            raise ValueError(
                f"cannot merge partial sums of {self.weighted_sum.size} and "
                f"{other.weighted_sum.size} parameters"
            )
        return PartialSum(
            self.weighted_sum + other.weighted_sum,
            self.total_weight + other.total_weight,
            self.contributors + other.contributors,
        )


class Strategy(Protocol):
    """A server aggregation rule, fed one update at a time."""

    def init(self, base: Mapping[str, F32]) -> None:
        """Start a round on ``base`` (the model devices trained from); clears the accumulator."""
        ...

    def fold(self, tensors: Sequence[Tensor], weight: float) -> None:
        """Add one update (per-tensor deltas, already checked against the spec and finite)."""
        ...

    def finalize(self) -> dict[str, F32]:
        """The new model, by tensor name in the spec's order."""
        ...

    def partial(self) -> PartialSum:
        """A copy of this round's state, to merge elsewhere or snapshot."""
        ...

    def merge(self, p: PartialSum) -> None:
        """Add a partial sum folded elsewhere (another worker, a gateway, a snapshot)."""
        ...

    @property
    def contributors(self) -> int:
        """Updates folded or merged in this round."""
        ...

    @property
    def total_weight(self) -> float:
        """Sum of their weights."""
        ...


def _positive_weight(weight: float) -> float:
    w = float(weight)
    if not math.isfinite(w) or w <= 0.0:
        raise ValueError(f"weight must be finite and > 0; got {weight!r}")
    return w


class FedAvg(Strategy):
    """Federated averaging: ``base + server_lr · Σ w·Δ / Σ w`` (McMahan et al. 2017).

    Updates are deltas from the base; ``weight`` is usually the device's ``num_examples``.
    ``server_lr = 1`` is plain FedAvg.
    """

    def __init__(self, spec: ModelSpec, server_lr: float = 1.0) -> None:
        lr = float(server_lr)
        if not math.isfinite(lr) or lr <= 0.0:
            raise ValueError(f"server_lr must be finite and > 0; got {server_lr!r}")
        self.spec = spec
        self.server_lr = lr
        # Allocated once and reused every round: memory does not grow with rounds or devices.
        self._acc: F64 = np.zeros(spec.total, dtype=np.float64)
        self._base: F32 = np.zeros(spec.total, dtype=np.float32)
        self._slices = tuple(spec.slices().values())
        self._total_weight = 0.0
        self._contributors = 0
        self._started = False

    @property
    def contributors(self) -> int:
        """Updates folded or merged in this round."""
        return self._contributors

    @property
    def total_weight(self) -> float:
        """Sum of their weights."""
        return self._total_weight

    def init(self, base: Mapping[str, F32]) -> None:
        """Start a round on ``base``: copy it and zero the accumulator."""
        if set(base) != set(self.spec.names):
            missing = sorted(set(self.spec.names) - set(base))
            extra = sorted(set(base) - set(self.spec.names))
            raise ValueError(f"base does not match the spec: missing {missing}, extra {extra}")
        for name, sl, shape in zip(self.spec.names, self._slices, self.spec.shapes, strict=True):
            a = base[name]
            if a.dtype != np.float32 or a.shape != shape:
                raise ValueError(
                    f"base tensor {name!r} is {a.dtype} {a.shape}; expected float32 {shape}"
                )
            self._base[sl] = a.reshape(-1)
        if not all_finite_fp32(self._base):
            raise ValueError("base model has NaN or inf values")
        self._acc.fill(0.0)
        self._total_weight = 0.0
        self._contributors = 0
        self._started = True

    def fold(self, tensors: Sequence[Tensor], weight: float) -> None:
        """Add ``weight · tensors``; checked whole first, so it folds fully or not at all."""
        self._require_started("fold")
        w = _positive_weight(weight)
        problem = self.spec.check(tensors, codecs=KERNELS.keys())
        if problem is not None:
            raise ValueError(f"update does not match the model: {problem}")
        total = self._total_weight + w
        if not math.isfinite(total):
            raise ValueError("total weight overflowed")
        for t in tensors:
            KERNELS[t.codec].fold(self._acc[self._slices[self.spec.index(t.name)]], t.data, w)
        self._total_weight = total
        self._contributors += 1

    def mean_delta(self) -> F64:
        """``Σ w·Δ / Σ w`` over the flat model, as a new float64 array."""
        self._require_started("mean_delta")
        if self._contributors == 0:
            raise ProtocolError("no updates in this round: there is nothing to average")
        mean: F64 = self._acc / self._total_weight
        return mean

    def finalize(self) -> dict[str, F32]:
        """``base + server_lr · mean_delta`` in float64, rounded once to float32.

        The arrays are views into one new buffer. Raises ``FloatingPointError`` rather than return
        a model with NaN or inf (a float32 overflow).
        """
        self._require_started("finalize")
        new = self.mean_delta()
        new *= self.server_lr
        new += self._base
        # An out-of-range value becomes inf here; it is reported just below with a clearer message.
        with np.errstate(over="ignore", invalid="ignore"):
            out = new.astype(np.float32)
        if not all_finite_fp32(out):
            raise FloatingPointError("the new model has NaN or inf values (float32 overflow)")
        return self.spec.split(out)

    def partial(self) -> PartialSum:
        """A copy of the accumulator, total weight and contributor count."""
        self._require_started("partial")
        return PartialSum(self._acc.copy(), self._total_weight, self._contributors)

    def merge(self, p: PartialSum) -> None:
        """Add a partial sum over the same spec."""
        self._require_started("merge")
        if p.weighted_sum.shape != self._acc.shape:
            raise ValueError(
                f"partial sum has {p.weighted_sum.size} parameters; the model has {self.spec.total}"
            )
        total = self._total_weight + p.total_weight
        if not math.isfinite(total):
            raise ValueError("total weight overflowed")
        self._acc += p.weighted_sum
        self._total_weight = total
        self._contributors += p.contributors

    def _require_started(self, what: str) -> None:
        if not self._started:
            raise ProtocolError(f"{what} before init(): no round has started")
