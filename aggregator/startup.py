"""What an aggregator starts from: its run id, the version-0 model, and the size of its
transport inbox."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedmq.config import AggregatorConfig
from fedmq.errors import ConfigError
from fedmq.models import init_mlp

__all__ = ["FOLD_BATCH", "inbox_bytes", "initial_weights", "new_run_id"]

Weights = dict[str, npt.NDArray[np.float32]]

#: Most queued updates the service folds in one pass over the accumulator.
FOLD_BATCH = 8

#: The inbox holds at most this many fp32 updates' bytes (or ``INBOX_MIN_BYTES``): memory
#: O(parameters) however many updates a round takes. Bounded here because the broker's
#: in-flight cap does not bound what it sends a client that acknowledges (``fedmq.inbox``).
INBOX_UPDATES = FOLD_BATCH
INBOX_MIN_BYTES = 8 * 1024 * 1024

#: The last run id this process gave out (a list: module state without ``global``).
_last_run_id = [0]


def new_run_id() -> int:
    """A new run's id (``fedmq.wire.newer``): the wall clock in milliseconds, so a later start
    has a larger one (as long as the clock does not go back by more than the time between them);
    strictly increasing within one process even when two runs start in the same millisecond."""
    _last_run_id[0] = max(time.time_ns() // 1_000_000, _last_run_id[0] + 1)
    return _last_run_id[0]


def inbox_bytes(parameters: int) -> int:
    """The transport inbox's cap in payload bytes for a model of ``parameters`` values."""
    return max(INBOX_MIN_BYTES, INBOX_UPDATES * 4 * parameters)


def initial_weights(config: AggregatorConfig) -> Weights:
    """The version-0 model: loaded from ``model.path`` (.npz) or initialised from ``layers``."""
    if config.model.path:
        path = Path(config.model.path)
        try:
            with np.load(path, allow_pickle=False) as data:
                # np.array, not np.ascontiguousarray: that makes a 0-d (scalar) tensor 1-d.
                return {name: np.array(data[name], dtype=np.float32, order="C", copy=True)
                        for name in data.files}
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.path {path}: cannot load arrays ({exc})") from None
    return init_mlp(config.model.layers, config.model.seed)
