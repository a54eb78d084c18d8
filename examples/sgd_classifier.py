"""A fedmq Trainer around scikit-learn's ``SGDClassifier`` (docs/trainers.md).

It federates with the built-in softmax model (aggregator ``[model] layers = [64, 10]``): the
weights are ``dense0.weight`` (features, classes) and ``dense0.bias`` (classes,), the
transposes of ``coef_`` and ``intercept_``, so devices running it and devices running the
built-in ``softmax`` trainer can share one federation. ``partial_fit`` runs one pass over the
local data per epoch from the global model's coefficients.

agent.toml, with this file beside it (the device needs ``pip install scikit-learn``)::

    [data]
    source = "digits"                 # or "npz" with path: arrays x and y
    [trainer]
    kind = "sgd_classifier:make_trainer"
    [trainer.options]
    alpha = 0.0001                    # SGDClassifier's L2 penalty
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import SGDClassifier

from device_agent.factory import load_local_data, split_holdout
from device_agent.trainers import EvalResult, FitResult, TrainConfig
from fedmq.config import AgentConfig
from fedmq.models import Weights

F32 = npt.NDArray[np.float32]


class SGDClassifierTrainer:
    """Logistic regression (one-vs-rest, ``loss="log_loss"``) trained by scikit-learn."""

    def __init__(self, x: F32, y: npt.NDArray[np.int64], x_eval: F32,
                 y_eval: npt.NDArray[np.int64], *, alpha: float) -> None:
        self.x, self.y = np.asarray(x, np.float32), np.asarray(y, np.int64)
        self.x_eval, self.y_eval = np.asarray(x_eval, np.float32), np.asarray(y_eval, np.int64)
        self.alpha = alpha

    def fit(self, weights: Weights, config: TrainConfig, round_seed: int) -> FitResult:
        w, b = weights["dense0.weight"], weights["dense0.bias"]
        # The class count is the model's, not the local labels': a device may lack a class.
        classes = np.arange(w.shape[1])
        model = SGDClassifier(loss="log_loss", alpha=self.alpha, learning_rate="constant",
                              eta0=config.lr, shuffle=False)
        # Start from the global model: partial_fit keeps coefficients that are already set.
        # They are new float32 arrays, so the read-only weights given are never written.
        model.coef_ = np.ascontiguousarray(w.T, dtype=np.float32)
        model.intercept_ = np.array(b, dtype=np.float32)
        rng = np.random.default_rng([config.seed, round_seed])  # a round can be replayed
        for _ in range(config.epochs):
            order = rng.permutation(len(self.y))
            model.partial_fit(self.x[order], self.y[order], classes=classes)
        new = {"dense0.weight": np.ascontiguousarray(model.coef_.T, dtype=np.float32),
               "dense0.bias": np.asarray(model.intercept_, dtype=np.float32)}
        return FitResult(weights=new, num_examples=len(self.y),
                         metrics={"train_accuracy": float(model.score(self.x, self.y))})

    def evaluate(self, weights: Weights) -> EvalResult:
        logits = self.x_eval @ weights["dense0.weight"] + weights["dense0.bias"]
        # Softmax cross-entropy of the scores: the loss the built-in softmax trainer reports,
        # so the federation's eval_loss means the same on every device.
        z = logits - logits.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        rows = np.arange(len(self.y_eval))
        return EvalResult(loss=float(-log_p[rows, self.y_eval].mean()),
                          accuracy=float((logits.argmax(axis=1) == self.y_eval).mean()),
                          num_examples=len(self.y_eval))


def make_trainer(config: AgentConfig, *, alpha: float = 1e-4) -> SGDClassifierTrainer:
    """The factory agent.toml names; ``alpha`` comes from ``[trainer.options]``."""
    x, y = load_local_data(config)  # [data]: a shard of the digits, or an .npz of x and y
    x_fit, y_fit, x_eval, y_eval = split_holdout(x, y, config.data.eval_fraction,
                                                 seed=config.data.seed)
    return SGDClassifierTrainer(x_fit, y_fit, x_eval, y_eval, alpha=alpha)
