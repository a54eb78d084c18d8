"""Adaptive server optimizers: FedAdagrad, FedAdam, FedYogi (Reddi et al. 2021, Algorithm 2).

The round's weighted mean delta Δ is a pseudo-gradient (a step the devices agree on, so the
model moves *along* it). Per coordinate, with η ``server_lr``::

    m ← β1·m + (1 - β1)·Δ
    v ← v + Δ²                                  FedAdagrad
    v ← β2·v + (1 - β2)·Δ²                      FedAdam
    v ← v - (1 - β2)·Δ²·sign(v - Δ²)            FedYogi
    x ← x + η·m / (√v + τ)

Starting state, as in the paper: ``m = 0`` and ``v = τ²`` (the least its ``v₋₁ ≥ τ²`` allows;
Flower starts from ``v = 0``, which the paper's condition excludes). No bias correction: the
paper has none (Flower's FedAdam scales η by ``√(1 - β2^(t+1)) / (1 - β1^(t+1))``, its FedYogi and
FedAdagrad do not). ``m`` and ``v`` are float64 arrays of the model's size; they outlive rounds
and go into snapshots (``state``).

Every step is written in the order the equations read (``η·m / (√v + τ)`` is ``(η·m) / (√v + τ)``),
so a numpy transcription of them gives the same bits; at most four model-sized float64
temporaries live while a round is finalized.
"""

from __future__ import annotations

import numpy as np

from aggregator.spec import ModelSpec
from aggregator.strategies.base import F64, StreamingFold, _finite_positive, _fraction

__all__ = ["FedAdagrad", "FedAdam", "FedYogi"]


class _Adaptive(StreamingFold):
    """The shared first moment and step; subclasses give the second moment."""

    def __init__(self, spec: ModelSpec, server_lr: float, beta1: float, tau: float) -> None:
        super().__init__(spec, server_lr)
        self.beta1 = _fraction("beta1", beta1)
        self.tau = _finite_positive("tau", tau)
        self._state = {"m": np.zeros(spec.total, dtype=np.float64),
                       "v": np.full(spec.total, self.tau**2, dtype=np.float64)}

    def _second_moment(self, v: F64, sq: F64) -> F64:
        """The new ``v`` (a new array) from the committed ``v`` and ``sq`` = Δ², which it may
        overwrite."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} ({self._settings()})"

    def _settings(self) -> str:
        return f"server_lr {self.server_lr:g}, beta1 {self.beta1:g}, tau {self.tau:g}"

    def _step(self, delta: F64) -> tuple[F64, dict[str, F64]]:
        m = self._state["m"] * self.beta1  # new arrays: the committed state stays as it was
        tmp = delta * (1.0 - self.beta1)
        m += tmp
        sq = np.multiply(delta, delta, out=tmp)
        v = self._second_moment(self._state["v"], sq)
        den = np.sqrt(v, out=sq)
        den += self.tau
        np.multiply(m, self.server_lr, out=delta)
        delta /= den
        delta += self._base
        return delta, {"m": m, "v": v}


class FedAdagrad(_Adaptive):
    """``v ← v + Δ²``: the step shrinks as squared pseudo-gradients add up."""

    name = "fedadagrad"

    def __init__(self, spec: ModelSpec, server_lr: float = 0.1, beta1: float = 0.9,
                 tau: float = 1e-3) -> None:
        super().__init__(spec, server_lr, beta1, tau)

    def _second_moment(self, v: F64, sq: F64) -> F64:
        out: F64 = v + sq
        return out


class _WithBeta2(_Adaptive):
    def __init__(self, spec: ModelSpec, server_lr: float, beta1: float, beta2: float,
                 tau: float) -> None:
        super().__init__(spec, server_lr, beta1, tau)
        self.beta2 = _fraction("beta2", beta2)

    def _settings(self) -> str:
        return (f"server_lr {self.server_lr:g}, beta1 {self.beta1:g}, beta2 {self.beta2:g}, "
                f"tau {self.tau:g}")


class FedAdam(_WithBeta2):
    """``v ← β2·v + (1 - β2)·Δ²``: an exponential average of squared pseudo-gradients."""

    name = "fedadam"

    def __init__(self, spec: ModelSpec, server_lr: float = 0.01, beta1: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(spec, server_lr, beta1, beta2, tau)

    def _second_moment(self, v: F64, sq: F64) -> F64:
        out: F64 = v * self.beta2
        sq *= 1.0 - self.beta2
        out += sq
        return out


class FedYogi(_WithBeta2):
    """``v ← v - (1 - β2)·Δ²·sign(v - Δ²)``: ``v`` moves towards Δ² by ``(1 - β2)·Δ²``, not by a
    fraction of the gap as Adam's does, so after large pseudo-gradients it decays slowly and the
    step grows back gently (Zaheer et al. 2018)."""

    name = "fedyogi"

    def __init__(self, spec: ModelSpec, server_lr: float = 0.01, beta1: float = 0.9,
                 beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(spec, server_lr, beta1, beta2, tau)

    def _second_moment(self, v: F64, sq: F64) -> F64:
        out: F64 = v - sq
        np.sign(out, out=out)
        sq *= 1.0 - self.beta2
        sq *= out
        np.subtract(v, sq, out=out)  # the sign's buffer becomes the new v
        return out
