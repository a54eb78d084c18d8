"""What ``agent.toml`` names, built: the device's trainer (built-in or ``package.module:factory``,
checked at start-up) and its local data."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from device_agent.trainers import MLPTrainer, SoftmaxTrainer, Trainer, check_trainer
from fedmq.config import AgentConfig
from fedmq.errors import ConfigError

__all__ = ["build_trainer", "load_local_data", "split_holdout"]


def build_trainer(config: AgentConfig) -> Trainer:
    """The trainer an agent config names, on the local data it names."""
    kind = config.trainer.kind
    if ":" in kind:  # "package.module:factory" — a user trainer, called with the config
        factory = _load_factory(kind)
        options = dict(config.trainer.options)
        try:  # a wrong option is a config error, not a TypeError from inside the factory
            inspect.signature(factory).bind(config, **options)
        except TypeError as exc:
            raise ConfigError(f"[trainer] options = {sorted(options)}: {kind!r} cannot be "
                              f"called as factory(config, **options): {exc}") from None
        except ValueError:  # no introspectable signature: let the call tell
            pass
        trainer: Trainer = factory(config, **options)
        try:
            check_trainer(trainer)
        except TypeError as exc:
            raise ConfigError(f"[trainer] kind = {kind!r}: {exc}") from None
        return trainer
    if config.trainer.options and kind in ("mlp", "softmax"):
        raise ConfigError(f"[trainer] options = {sorted(config.trainer.options)}: the built-in "
                          f"trainer {kind!r} takes no options (they are for a "
                          "'package.module:factory' trainer)")
    x, y = load_local_data(config)
    x_train, y_train, x_eval, y_eval = split_holdout(
        x, y, config.data.eval_fraction, _holdout_seed(config))
    # A device may hold only a few labels: the class count comes from the whole data set
    # (digits), or from the model it is sent (npz: None, the last layer's output size).
    num_classes = 10 if config.data.source == "digits" else None
    holdout = (x_eval, y_eval) if len(y_eval) else None
    if kind == "mlp":
        return MLPTrainer(x_train, y_train, num_classes=num_classes, holdout=holdout)
    if kind == "softmax":
        return SoftmaxTrainer(x_train, y_train, num_classes=num_classes, holdout=holdout)
    raise ConfigError(f"trainer.kind {kind!r} is not known: use 'mlp', 'softmax' or "
                      "'package.module:factory'")


def split_holdout(x: np.ndarray, y: np.ndarray, fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_eval, y_eval): a seeded random ``fraction`` of the rows held out.

    At least one row goes each way when the fraction is strictly between 0 and 1 and there are
    two rows or more; 0 holds nothing out, 1 everything (an evaluation-only device).
    """
    n = len(y)
    k = round(n * fraction)
    if 0.0 < fraction < 1.0 and n >= 2:
        k = min(max(k, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    held, kept = np.sort(order[:k]), np.sort(order[k:])
    return x[kept], y[kept], x[held], y[held]


def _holdout_seed(config: AgentConfig) -> int:
    """Stable per device and data seed, so a restart holds out the same rows."""
    digest = hashlib.sha256(f"{config.data.seed}/{config.device_id()}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _load_factory(kind: str, key: str = "[trainer] kind", what: str = "factory"
                  ) -> Callable[..., Any]:
    """The callable ``[trainer] kind = "package.module:factory"`` (or another ``key``) names.

    The module is looked for in the working directory too: the ``fedmq`` console script's
    ``sys.path`` does not hold it, yet that is where a trainer kept beside agent.toml lives.
    It stays on ``sys.path``, so the module's own lazy imports of its neighbours work as well.
    """
    module_name, _, attr = kind.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key} = {kind!r}: expected 'package.module:{what}'")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"{key} = {kind!r}: cannot import module {module_name!r} "
                          f"(from {cwd} or sys.path): {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(f"{key} = {kind!r}: module {module_name!r} "
                          f"({getattr(module, '__file__', '?')}) has no attribute {attr!r}")
    if not callable(factory):
        raise ConfigError(f"{key} = {kind!r}: {attr!r} is not callable")
    return factory  # type: ignore[no-any-return]


def load_local_data(config: AgentConfig) -> tuple[np.ndarray, np.ndarray]:
    """The device's own examples, as (x float32, y int64)."""
    d = config.data
    if d.source == "npz":
        if not d.path:
            raise ConfigError("data.source = 'npz' needs data.path")
        with np.load(d.path, allow_pickle=False) as f:
            return np.asarray(f["x"], dtype=np.float32), np.asarray(f["y"], dtype=np.int64)
    from fedmq.datasets import load_digits_split, partition

    x_train, y_train, _, _ = load_digits_split(d.seed)
    shard = config.shard()
    if not 0 <= shard < d.num_shards:
        raise ConfigError(f"data.shard {shard} is outside 0..{d.num_shards - 1}")
    idx = partition(y_train, d.num_shards, d.partition, d.seed)[shard]
    return x_train[idx], y_train[idx]
