"""Local training on the device: the :class:`Trainer` protocol and built-in numpy models.

The agent hands a trainer the current global model and the round's :class:`TrainConfig` and
publishes what :meth:`Trainer.fit` returns. Built in: :class:`MLPTrainer` (any chain of dense
layers, ReLU between them, softmax cross-entropy) and :class:`SoftmaxTrainer` (no hidden layer).
Everything is float32 numpy so it runs on Raspberry Pi class hardware.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from fedmq.models import (
    MAX_BATCH_SIZE,
    MAX_EPOCHS,
    MAX_LR,
    MAX_PROXIMAL_MU,
    Weights,
    layer_sizes_of,
)

__all__ = [
    "EvalResult",
    "FitResult",
    "MLPTrainer",
    "SoftmaxTrainer",
    "TrainConfig",
    "Trainer",
    "check_trainer",
    "loss_and_gradients",
]

_MAX_SEED = (1 << 63) - 1
# Rows per forward pass in evaluate(): bounds memory on 512 MB devices with large local sets.
_EVAL_CHUNK = 4096


@dataclass(frozen=True)
class TrainConfig:
    """Local training hyper-parameters, sent by the aggregator in each round announcement.

    The defaults were tuned with ``benchmarks/sim_fedavg.py`` (digits, 20 devices, FedAvg, the
    default 64-128-10 model) to work for both IID and 2-label-shard partitions.
    """

    epochs: int = 5
    batch_size: int = 10
    lr: float = 0.3
    seed: int = 0
    #: FedProx (Li et al. 2020): the built-in trainers add ``proximal_mu / 2 * ||w - w_global||^2``
    #: to their loss, which keeps a device's model near the global one on non-IID data; 0 is
    #: plain FedAvg. A custom trainer reads it here and may apply it the same way.
    proximal_mu: float = 0.0
    #: Every other key of the announcement's ``train`` map (the aggregator's extra ``[train]``
    #: keys): numbers and strings a custom trainer may read, e.g. ``config.extra.get("l2", 0.0)``.
    extra: Mapping[str, float | int | str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _check_int("epochs", self.epochs, 1, MAX_EPOCHS)
        _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        _check_int("seed", self.seed, 0, _MAX_SEED)
        if isinstance(self.lr, bool) or not isinstance(self.lr, int | float):
            raise ValueError(f"lr must be a number, got {type(self.lr).__name__}")
        if not (math.isfinite(self.lr) and 0.0 < self.lr <= MAX_LR):
            raise ValueError(f"lr must be a finite number in (0, {MAX_LR}], got {self.lr!r}")
        # Normalise lr=1 to 1.0 so equal configs compare and serialise the same.
        object.__setattr__(self, "lr", float(self.lr))
        mu = self.proximal_mu
        if isinstance(mu, bool) or not isinstance(mu, int | float) or not (
                math.isfinite(mu) and 0.0 <= mu <= MAX_PROXIMAL_MU):
            raise ValueError(f"proximal_mu must be a number in [0, {MAX_PROXIMAL_MU}], got "
                             f"{mu!r}")
        object.__setattr__(self, "proximal_mu", float(mu))
        for key, value in self.extra.items():
            if key in _KNOWN_KEYS:
                raise ValueError(f"extra training setting {key!r} is a TrainConfig field")
            _check_extra(key, value)
        # A private copy: the caller's dict cannot change a frozen config afterwards.
        object.__setattr__(self, "extra", dict(self.extra))

    @classmethod
    def from_mapping(cls, m: Mapping[str, object]) -> TrainConfig:
        """Build from a decoded network map: missing keys take defaults, every other key goes
        into ``extra``.

        Raises ``ValueError`` naming the key if a value has the wrong type or is out of range.
        """
        kwargs: dict[str, Any] = {}
        extra = {key: value for key, value in m.items() if key not in _KNOWN_KEYS}
        for key, value in extra.items():
            _check_extra(key, value)
        if extra:
            kwargs["extra"] = extra
        for key in ("epochs", "batch_size", "seed"):
            if key in m:
                value = m[key]
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"training config {key!r} must be an integer, got {value!r}")
                kwargs[key] = value
        for key in ("lr", "proximal_mu"):
            if key in m:
                value = m[key]
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"training config {key!r} must be a number, got {value!r}")
                kwargs[key] = float(value)
        return cls(**kwargs)


#: The ``train`` map's keys TrainConfig has fields for; the others are ``extra``.
_KNOWN_KEYS = frozenset({"epochs", "batch_size", "lr", "seed", "proximal_mu"})


def _check_extra(key: object, value: object) -> None:
    """An extra setting is what the wire's ``train`` map carries: a string key, and a finite
    number (not a boolean) or a string."""
    if not isinstance(key, str):
        raise ValueError(f"training config keys must be strings, got {key!r}")
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"training config {key!r} must be a number or a string, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"training config {key!r} must be finite, got {value!r}")


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


@dataclass
class FitResult:
    """What local training produced: the new weights, how many examples (the FedAvg weight)."""

    weights: Weights
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalResult:
    """How well a model does on a device's held-out data: the mean loss, the accuracy (None for
    a model that has none, e.g. a regression), and any other scalar metrics (``metrics``, e.g.
    ``{"mae": 0.4}``). ``num_examples`` (the held-out examples) weighs the report."""

    loss: float
    accuracy: float | None
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Trainer(Protocol):
    """What the device agent needs from a model; implement it to federate your own model.

    The whole contract, with a worked example, is docs/trainers.md. In short:

    - ``fit(weights, config, round_seed)`` starts from ``weights`` (the global model: read-only
      float32 arrays; return the same names and shapes), trains on local data per ``config``
      and returns a :class:`FitResult`. ``num_examples`` is the weight of this update in the
      average: the number of local training examples. Seed any randomness from
      ``(config.seed, round_seed)`` so a round can be replayed.
    - ``evaluate(weights)`` scores ``weights`` on held-out local data (never trained on) and
      returns an :class:`EvalResult`; it must not change any state.

    Return float32 tensors; anything else is cast before encoding.
    """

    def fit(self, weights: Weights, config: TrainConfig, round_seed: int) -> FitResult:
        """Train locally from ``weights`` and return the new weights."""
        ...

    def evaluate(self, weights: Weights) -> EvalResult:
        """Loss (and accuracy, other metrics) of ``weights`` on held-out local data."""
        ...


#: The methods a trainer must have, and the parameters the agent passes them (positionally).
_METHODS = {"fit": ("weights", "config", "round_seed"), "evaluate": ("weights",)}


def check_trainer(trainer: object) -> None:
    """Raise ``TypeError`` (one line, naming the method) unless ``trainer`` fits :class:`Trainer`.

    Run at start-up, so a wrong signature fails there and not at the first round. Lenient:
    extra parameters with defaults, ``*args`` and ``**kwargs`` are fine; what matters is that
    ``fit(weights, config, round_seed)`` and ``evaluate(weights)`` can be called as the agent
    calls them.
    """
    for name, params in _METHODS.items():
        wanted = f"{name}({', '.join(params)})"
        method = getattr(trainer, name, None)
        if method is None or not callable(method):
            raise TypeError(f"{type(trainer).__name__} has no callable {wanted}")
        try:
            signature = inspect.signature(method)
        except (TypeError, ValueError):  # no introspectable signature (a C callable): trust it
            continue
        try:
            signature.bind(*params)
        except TypeError as exc:
            raise TypeError(f"{type(trainer).__name__}.{name}{signature} cannot be called as "
                            f"{wanted}: {exc}") from None


_Layer = tuple[npt.NDArray[Any], npt.NDArray[Any]]
"""(weight, bias) of one dense layer."""


def _params(weights: Mapping[str, npt.NDArray[Any]]) -> list[_Layer]:
    n = len(layer_sizes_of(weights)) - 1
    return [(weights[f"dense{i}.weight"], weights[f"dense{i}.bias"]) for i in range(n)]


def _forward(
    layers: Sequence[_Layer], x: npt.NDArray[Any]
) -> tuple[list[npt.NDArray[Any]], npt.NDArray[Any]]:
    """Inputs of every layer (kept for backprop) and the output logits."""
    inputs = []
    h = x
    for i, (w, b) in enumerate(layers):
        inputs.append(h)
        h = h @ w
        h += b
        if i < len(layers) - 1:
            np.maximum(h, 0, out=h)
    return inputs, h


def _log_softmax(logits: npt.NDArray[Any]) -> npt.NDArray[Any]:
    # Subtracting the row max keeps exp() finite for any logits.
    z = logits - logits.max(axis=1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
    return np.asarray(z)


def _loss_grads(
    layers: Sequence[_Layer], x: npt.NDArray[Any], y: npt.NDArray[Any]
) -> tuple[float, int, list[_Layer]]:
    """Mean cross-entropy, number of correct predictions, and (dW, db) per layer."""
    n = x.shape[0]
    inputs, logits = _forward(layers, x)
    logp = _log_softmax(logits)
    rows = np.arange(n)
    loss = -float(logp[rows, y].mean())
    correct = int((logits.argmax(axis=1) == y).sum())
    # d(mean CE)/d(logits) = (softmax - onehot) / n
    g = np.exp(logp)
    g[rows, y] -= 1
    g /= n
    grads: list[_Layer] = []
    for i in range(len(layers) - 1, -1, -1):
        w = layers[i][0]
        h = inputs[i]
        grads.append((h.T @ g, g.sum(axis=0)))
        if i:
            g = g @ w.T
            # ReLU gate: h is the post-activation input of this layer, zero exactly where clipped.
            g *= h > 0
    grads.reverse()
    return loss, correct, grads


def loss_and_gradients(
    weights: Mapping[str, npt.NDArray[np.floating[Any]]],
    x: npt.NDArray[np.floating[Any]],
    y: npt.NDArray[np.integer[Any]],
) -> tuple[float, dict[str, npt.NDArray[np.floating[Any]]]]:
    """Mean softmax cross-entropy of a dense-ReLU chain on ``(x, y)`` and its gradients.

    Works in the dtype of the inputs (float64 for gradient checks); gradients are keyed and
    ordered like ``weights``.
    """
    layers = _params(weights)
    loss, _, grads = _loss_grads(layers, x, np.asarray(y))
    out: dict[str, npt.NDArray[np.floating[Any]]] = {}
    for i, (dw, db) in enumerate(grads):
        out[f"dense{i}.weight"] = dw
        out[f"dense{i}.bias"] = db
    return loss, out


def _examples(x: npt.ArrayLike, y: npt.ArrayLike, num_classes: int | None, xname: str,
              yname: str, *, allow_empty: bool) -> tuple[npt.NDArray[np.float32],
                                                          npt.NDArray[np.intp]]:
    """Checked (x float32, y intp) rows of local data; ValueError naming what is wrong."""
    xa = np.asarray(x)
    ya = np.asarray(y)
    if xa.ndim != 2:
        raise ValueError(f"{xname} must be 2-D (examples, features), got shape {xa.shape}")
    if ya.ndim != 1 or ya.shape[0] != xa.shape[0]:
        raise ValueError(f"{yname} must be 1-D with one label per row of {xname} "
                         f"({xa.shape[0]}), got shape {ya.shape}")
    if xa.shape[0] == 0:
        if allow_empty:
            return (np.zeros(xa.shape, dtype=np.float32), np.zeros(0, dtype=np.intp))
        raise ValueError(f"no local examples: a trainer needs at least one ({xname}, {yname}) "
                         "row")
    if not np.issubdtype(ya.dtype, np.integer):
        raise ValueError(f"{yname} must hold integer class labels, got dtype {ya.dtype}")
    if ya.min() < 0 or (num_classes is not None and ya.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes or 'classes'}), got range "
                         f"[{ya.min()}, {ya.max()}]")
    if not np.isfinite(xa).all():
        raise ValueError(f"{xname} contains NaN or infinite values")
    return np.ascontiguousarray(xa, dtype=np.float32), ya.astype(np.intp)


class MLPTrainer:
    """Minibatch SGD on local data for any chain of dense layers (ReLU hidden, softmax output).

    The architecture is read from the weights passed to :meth:`fit`, so one trainer serves
    softmax regression and MLPs alike. With ``num_classes=None`` the class count is the model's
    output size too (the local labels need only be below it): a device's own labels may well
    lack the top classes. ``fit`` is deterministic in
    ``(weights, config, round_seed)`` and never modifies the weights passed in.
    """

    def __init__(self, x: npt.ArrayLike, y: npt.ArrayLike, num_classes: int | None, *,
                 holdout: tuple[npt.ArrayLike, npt.ArrayLike] | None = None) -> None:
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        # Without a held-out split, evaluate() measures the training data (the old behaviour,
        # kept for direct use); the agent's factory always gives one (``[data] eval_fraction``).
        # An evaluation-only device (all data held out) has no training rows at all.
        self._x, self._y = _examples(x, y, num_classes, "x", "y",
                                     allow_empty=holdout is not None)
        if holdout is None:
            self._ex, self._ey = self._x, self._y
        else:
            self._ex, self._ey = _examples(*holdout, num_classes, "holdout x", "holdout y",
                                           allow_empty=self.num_examples > 0)

    @property
    def num_examples(self) -> int:
        """Number of local training examples."""
        return int(self._x.shape[0])

    @property
    def num_eval_examples(self) -> int:
        """Number of examples ``evaluate`` measures (the held-out split, if one was given)."""
        return int(self._ex.shape[0])

    def _check(self, weights: Weights) -> list[int]:
        sizes = layer_sizes_of(weights)
        if sizes[0] != self._x.shape[1]:
            raise ValueError(
                f"model takes {sizes[0]} inputs but local data has {self._x.shape[1]} features"
            )
        top = max((int(a.max()) for a in (self._y, self._ey) if a.size), default=-1)
        if self.num_classes is None:  # the model says how many classes there are
            if sizes[-1] <= top:
                raise ValueError(f"model outputs {sizes[-1]} classes but the local labels go "
                                 f"up to {top}")
        elif sizes[-1] != self.num_classes:
            raise ValueError(
                f"model outputs {sizes[-1]} classes but the trainer expects {self.num_classes}"
            )
        return sizes

    def fit(self, weights: Weights, config: TrainConfig, round_seed: int) -> FitResult:
        """Run ``config.epochs`` epochs of minibatch SGD from a copy of ``weights``."""
        self._check(weights)
        if not self.num_examples:
            raise ValueError("no local training examples: this device only evaluates "
                             "([data] eval_fraction = 1)")
        if isinstance(round_seed, bool) or not isinstance(round_seed, int) or round_seed < 0:
            raise ValueError(f"round_seed must be a non-negative integer, got {round_seed!r}")
        # Private float32 copies: the caller's arrays stay untouched (the agent diffs against them).
        layers: list[_Layer] = [
            (w.astype(np.float32), b.astype(np.float32)) for w, b in _params(weights)
        ]
        # FedProx: the gradient of mu/2 * ||w - w_global||^2 is mu * (w - w_global).
        mu = np.float32(config.proximal_mu)
        anchor = ([(w.astype(np.float32), b.astype(np.float32)) for w, b in _params(weights)]
                  if config.proximal_mu else None)
        rng = np.random.default_rng([config.seed, round_seed])
        n = self.num_examples
        bs = min(config.batch_size, n)
        lr = np.float32(config.lr)
        loss_sum = 0.0
        correct = 0
        for _ in range(config.epochs):
            order = rng.permutation(n)
            x, y = self._x[order], self._y[order]
            loss_sum = 0.0
            correct = 0
            for start in range(0, n, bs):
                xb, yb = x[start : start + bs], y[start : start + bs]
                loss, ok, grads = _loss_grads(layers, xb, yb)
                loss_sum += loss * xb.shape[0]
                correct += ok
                # In-place steps on the private copies; no per-step allocation of new weights.
                if anchor is not None:
                    for (w, b), (dw, db), (w0, b0) in zip(layers, grads, anchor, strict=True):
                        np.add(dw, mu * (w - w0), out=dw)
                        np.add(db, mu * (b - b0), out=db)
                for (w, b), (dw, db) in zip(layers, grads, strict=True):
                    np.subtract(w, lr * dw, out=w)
                    np.subtract(b, lr * db, out=b)
        out: Weights = {}
        for i, (w, b) in enumerate(layers):
            out[f"dense{i}.weight"] = w
            out[f"dense{i}.bias"] = b
        # Metrics are over the last epoch, measured on each batch before its step (free to get).
        metrics = {"train_loss": loss_sum / n, "train_accuracy": correct / n}
        return FitResult(weights=out, num_examples=n, metrics=metrics)

    def evaluate(self, weights: Weights) -> EvalResult:
        """Mean cross-entropy and accuracy of ``weights`` on the held-out data (the training
        data when the trainer was built without a held-out split)."""
        self._check(weights)
        layers: list[_Layer] = [
            (w.astype(np.float32, copy=False), b.astype(np.float32, copy=False))
            for w, b in _params(weights)
        ]
        n = self.num_eval_examples
        if not n:
            raise ValueError("no held-out examples to evaluate on")
        loss_sum = 0.0
        correct = 0
        for start in range(0, n, _EVAL_CHUNK):
            xb, yb = self._ex[start : start + _EVAL_CHUNK], self._ey[start : start + _EVAL_CHUNK]
            _, logits = _forward(layers, xb)
            logp = _log_softmax(logits)
            loss_sum -= float(logp[np.arange(xb.shape[0]), yb].sum(dtype=np.float64))
            correct += int((logits.argmax(axis=1) == yb).sum())
        return EvalResult(loss=loss_sum / n, accuracy=correct / n, num_examples=n)


class SoftmaxTrainer(MLPTrainer):
    """:class:`MLPTrainer` restricted to softmax regression (a single dense layer)."""

    def _check(self, weights: Weights) -> list[int]:
        sizes = super()._check(weights)
        if len(sizes) != 2:
            raise ValueError(f"SoftmaxTrainer takes a single dense layer, got layer sizes {sizes}")
        return sizes
