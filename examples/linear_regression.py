"""A fedmq Trainer: linear regression of a room's temperature on four sensor readings.

The worked example of docs/trainers.md (the page shows this file as it is). Keep it beside
agent.toml and name it there: ``[trainer] kind = "linear_regression:make_trainer"``. The model
is two tensors, ``weight`` (4,) and ``bias`` (), a scalar. The readings are generated here
(seeded by the device id) so that the example runs anywhere; a real device would load its own
log in ``make_trainer``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt

from device_agent.trainers import EvalResult, FitResult, TrainConfig
from fedmq.config import AgentConfig
from fedmq.models import Weights

F32 = npt.NDArray[np.float32]

#: The standardised readings (humidity, pressure, light, CO2) and how the temperature (°C)
#: depends on them: what the federation should learn.
TRUE_WEIGHT = np.array([1.5, -2.0, 0.5, 3.0], dtype=np.float32)
TRUE_BIAS = 21.0


def sensor_readings(device_id: str, samples: int, noise: float) -> tuple[F32, F32]:
    """This device's log: ``samples`` rows of readings and the temperature measured with them."""
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8]))
    x = rng.normal(size=(samples, TRUE_WEIGHT.size)).astype(np.float32)
    y = x @ TRUE_WEIGHT + TRUE_BIAS + rng.normal(scale=noise, size=samples)
    return x, y.astype(np.float32)


class LinearRegression:
    """Minibatch SGD on the mean squared error; evaluates on rows it never trains on."""

    def __init__(self, x: F32, y: F32, eval_fraction: float) -> None:
        held = round(len(y) * eval_fraction)
        self.x_eval, self.y_eval = x[:held], y[:held]  # held out: evaluate() only
        self.x, self.y = x[held:], y[held:]  # trained on

    def fit(self, weights: Weights, config: TrainConfig, round_seed: int) -> FitResult:
        w = weights["weight"].copy()  # the arrays given are read-only: train on copies
        b = weights["bias"].copy()  # shape (): a scalar tensor stays one
        l2 = float(config.extra.get("l2", 0.0))  # an extra [train] key of the aggregator
        lr = np.float32(config.lr)
        rng = np.random.default_rng([config.seed, round_seed])  # a round can be replayed
        n = len(self.y)
        for _ in range(config.epochs):
            order = rng.permutation(n)
            for start in range(0, n, config.batch_size):
                rows = order[start:start + config.batch_size]
                err = self.x[rows] @ w + b - self.y[rows]
                w -= lr * (2 * self.x[rows].T @ err / len(rows) + np.float32(2 * l2) * w)
                b -= lr * 2 * err.mean()
        train_loss = float(np.mean((self.x @ w + b - self.y) ** 2))
        return FitResult(weights={"weight": w, "bias": b}, num_examples=n,
                         metrics={"train_loss": train_loss})

    def evaluate(self, weights: Weights) -> EvalResult:
        err = self.x_eval @ weights["weight"] + weights["bias"] - self.y_eval
        # A regression has no accuracy: None, and the mean absolute error beside the loss.
        return EvalResult(loss=float(np.mean(err**2)), accuracy=None,
                          num_examples=len(self.y_eval),
                          metrics={"mae": float(np.mean(np.abs(err)))})


def make_trainer(config: AgentConfig, *, samples: int = 500,
                 noise: float = 0.5) -> LinearRegression:
    """The factory agent.toml names: the agent config, then ``[trainer] options``."""
    x, y = sensor_readings(config.device_id(), samples, noise)
    return LinearRegression(x, y, config.data.eval_fraction)
