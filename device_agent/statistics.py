"""A device's side of a statistics federation (``[task] kind = "statistics"``, docs/analytics.md).

Each round the aggregator announces columns and their bin edges; the device reads its values
(``Analyst.values``: the arrays of its ``[data]`` .npz file, one column per array name, read
afresh each round; or what ``[task] statistics = "package.module:function"`` returns), sums each
column up with ``fedmq.statistics.summarize`` and sends the summaries as one ordinary update of
float64 tensors. Only the summaries leave the device, never a value.

A column the device does not have, or does not share (``[task] columns``), goes out empty
(count 0): the device still answers the round, and the result lists it among the devices it
covers. Pure numpy: no numba, nothing from ``aggregator``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from device_agent.trainers import EvalResult, FitResult, TrainConfig
from fedmq.compression import Weights
from fedmq.config import AgentConfig
from fedmq.errors import ConfigError
from fedmq.statistics import Summary, contribution_tensors, empty, summarize
from fedmq.wire import ModelUpdate, RoundAnnouncement, StatsColumn

__all__ = ["Analyst", "NoTraining", "npz_columns"]

log = logging.getLogger(__name__)

Values = Mapping[str, npt.ArrayLike]


def npz_columns(path: str | Path) -> dict[str, npt.NDArray[np.float64]]:
    """Every array of an .npz file as a column of float64 values (flattened)."""
    with np.load(path, allow_pickle=False) as f:
        return {name: np.asarray(f[name], dtype=np.float64).ravel() for name in f.files}


class Analyst:
    """Computes this device's contribution to a statistics round."""

    def __init__(self, values: Callable[[], Values], shared: Sequence[str] = ()) -> None:
        #: Called each round: ``{column: values}`` (any array-like of numbers).
        self.values = values
        #: The only columns shared (empty: all the device has).
        self.shared = frozenset(shared)
        self._said: set[str] = set()  # columns whose absence was logged already

    @classmethod
    def from_config(cls, config: AgentConfig) -> Analyst:
        """The analyst ``[task]`` and ``[data]`` describe; a file that cannot be read or a
        function that cannot be imported is a ``ConfigError`` now, not at the first round."""
        task = config.task
        if task.statistics is not None:
            from device_agent.factory import _load_factory

            function = _load_factory(task.statistics, "[task] statistics", "function")
            return cls(lambda: function(config), task.columns)
        path = config.data.path or ""
        try:
            npz_columns(path)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"[data] path = {path!r}: not a readable .npz file: {exc}") from None
        return cls(lambda: npz_columns(path), task.columns)

    def summaries(self, columns: Sequence[StatsColumn]) -> dict[str, Summary]:
        """This device's summary of each announced column (empty where it has no values)."""
        got = self.values()
        if not isinstance(got, Mapping):
            raise TypeError(f"the statistics function returned {type(got).__name__}, not a "
                            "mapping of column name to values")
        out = {}
        for c in columns:
            if c.name not in got or (self.shared and c.name not in self.shared):
                if c.name not in self._said:
                    self._said.add(c.name)
                    log.info("column %r: %s; contributed empty", c.name,
                             "not shared" if c.name in got else "no such values here")
                out[c.name] = empty(len(c.edges) - 1)
            else:
                out[c.name] = summarize(got[c.name], c.edges)
        return out

    def update(self, federation: str, device_id: str, ann: RoundAnnouncement,
               version: int) -> ModelUpdate:
        """The contribution to round ``ann`` on model ``version``, ready to encode."""
        tensors = contribution_tensors(self.summaries(ann.columns))
        return ModelUpdate(
            federation=federation, device_id=device_id, round=ann.round, base_version=version,
            update_id=uuid.uuid4().hex, run=ann.run,
            num_examples=1,  # a contribution counts once: its counts travel in its tensors
            tensors=tensors, metrics={})


class NoTraining:
    """The trainer of a statistics device: it has no model to train or score."""

    def fit(self, weights: Weights, config: TrainConfig, round_seed: int) -> FitResult:
        raise RuntimeError('this device computes statistics ([task] kind = "statistics"), '
                           "but the federation announced a training round")

    def evaluate(self, weights: Weights) -> EvalResult:
        raise RuntimeError("a statistics device has no model to evaluate")

