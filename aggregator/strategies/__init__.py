"""Aggregation strategies: streaming ``init / fold / finalize`` over a round's updates.

Every strategy folds updates the same way (``base``: ``Σ w·x`` into one float64 accumulator,
memory O(params)); they differ in how ``finalize`` turns the round's mean delta into the new
model: ``fedavg`` (``FedAvg``, ``FedAvgM``) and the adaptive server optimizers (``adaptive``:
``FedAdagrad``, ``FedAdam``, ``FedYogi``). ``build_strategy`` makes the one ``[strategy] name``
asks for; docs/learning.md gives the update rules and defaults.
"""

from __future__ import annotations

from collections.abc import Callable

from aggregator.spec import ModelSpec
from aggregator.strategies.adaptive import FedAdagrad, FedAdam, FedYogi
from aggregator.strategies.base import PartialSum, Strategy, StreamingFold
from aggregator.strategies.fedavg import FedAvg, FedAvgM
from fedmq.config import StrategyConfig

__all__ = [
    "STRATEGIES",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "PartialSum",
    "Strategy",
    "StreamingFold",
    "build_strategy",
]

#: The strategy class of each ``[strategy] name``.
STRATEGIES: dict[str, Callable[..., StreamingFold]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam, FedYogi, FedAdagrad)
}


def build_strategy(config: StrategyConfig, spec: ModelSpec) -> Strategy:
    """The strategy ``config`` names, with its settings (defaults where a key is unset)."""
    return STRATEGIES[config.name](spec, **config.settings())
