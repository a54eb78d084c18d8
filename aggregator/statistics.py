"""The aggregator's side of a statistics federation (``[task] kind = "statistics"``).

Rounds, admission, duplicates, the write-ahead log and snapshots work exactly as for training:
a device's contribution is an ordinary update on ``update/{device}`` (float64 tensors,
``fedmq.statistics``), accepted or rejected by the same round machine. What differs is plugged
in by ``attach``:

- the model is a placeholder (one empty float32 tensor, ``statistics``): devices follow its
  versions like a training federation's, and each closed round publishes the next version;
- ``StatisticsStrategy`` (the ``Strategy`` protocol: init / fold / finalize / export_state /
  import_state) merges contributions with Chan et al.'s algorithm, in O(columns x bins);
- ``StatisticsTask.check`` vets each contribution at admission (a bad one is a counted
  rejection: ``wrong_shape``, ``non_finite`` or ``invalid_statistics``), so the fold never
  sees one it cannot merge;
- the norm bound is off (a contribution is not a delta: its norm means nothing);
- ``StatisticsTask.publish`` puts each round's result, retained, on ``fedmq/v1/{fed}/result``,
  listing the devices it covers (the round's accepted ones: a device that dropped out is not
  in it).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import numpy.typing as npt

from aggregator.folding import BoundedFold
from aggregator.robust import NormBound
from aggregator.spec import ModelSpec
from aggregator.strategies import PartialSum
from fedmq import codec
from fedmq.config import RobustConfig
from fedmq.errors import ProtocolError
from fedmq.statistics import (
    FIELDS,
    Summary,
    column_statistics,
    empty,
    from_flat,
    merge,
    query_of,
    read_contribution,
    to_flat,
)
from fedmq.wire import (
    ColumnStatistics,
    ModelUpdate,
    RoundSummary,
    StatisticsResult,
    StatsColumn,
    Tensor,
)

if TYPE_CHECKING:
    from aggregator.service import AggregatorService

__all__ = ["PLACEHOLDER", "StatisticsStrategy", "StatisticsTask", "attach", "placeholder_model"]

log = logging.getLogger("aggregator.service")

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

#: The name of the placeholder model's one (empty) tensor.
PLACEHOLDER = "statistics"


def placeholder_model() -> dict[str, F32]:
    """A statistics federation's model: nothing to train, only versions to follow."""
    return {PLACEHOLDER: np.zeros(0, dtype=np.float32)}


class StatisticsStrategy:
    """Merges a round's contributions into one ``Summary`` per column (``fedmq.statistics``).

    ``fold`` takes tensors ``StatisticsTask.check`` accepted; weights and clip factors mean
    nothing here and are ignored. ``finalize`` returns the placeholder model unchanged and
    keeps the round's columns in ``result``.
    """

    name: ClassVar[str] = "statistics"

    def __init__(self, columns: Sequence[StatsColumn]) -> None:
        self.columns = tuple(columns)
        self._merged = [empty(len(c.edges) - 1) for c in self.columns]
        self._contributors = 0
        self._base: dict[str, F32] = placeholder_model()
        #: The last finalized round's statistics, per column.
        self.result: tuple[ColumnStatistics, ...] = ()

    def describe(self) -> str:
        return (f"statistics ({len(self.columns)} columns: "
                f"{', '.join(c.name for c in self.columns)})")

    @property
    def contributors(self) -> int:
        return self._contributors

    @property
    def total_weight(self) -> float:
        return float(self._contributors)

    @property
    def incomplete(self) -> int:
        return 0  # contributions are never chunked

    @property
    def summaries(self) -> tuple[Summary, ...]:
        """The running merge, per column in query order."""
        return tuple(self._merged)

    def init(self, base: Mapping[str, F32]) -> None:
        self._base = {k: np.array(v, dtype=np.float32) for k, v in base.items()}
        self._merged = [empty(len(c.edges) - 1) for c in self.columns]
        self._contributors = 0

    def fold(self, tensors: Sequence[Tensor], weight: float, scale: float = 1.0) -> None:
        summaries, reason, detail = read_contribution(tensors, self.columns)
        if summaries is None:  # admission checked it: this is a bug, not a device's doing
            raise ValueError(f"contribution does not fit the query: {reason} ({detail})")
        self._merged = [merge(m, summaries[c.name])
                        for m, c in zip(self._merged, self.columns, strict=True)]
        self._contributors += 1

    def fold_many(self, updates: Sequence[tuple[Sequence[Tensor], float, float]]) -> None:
        for tensors, weight, scale in updates:
            self.fold(tensors, weight, scale)

    def fold_part(self, key: Hashable, tensors: Sequence[Tensor], weight: float,
                  scale: float = 1.0) -> None:
        raise ProtocolError("statistics contributions are never chunked")

    def settle(self, key: Hashable) -> None:
        raise ProtocolError("statistics contributions are never chunked")

    def finalize(self) -> dict[str, F32]:
        if not self._contributors:
            raise ProtocolError("no contributions in this round: there are no statistics")
        self.result = tuple(column_statistics(c.name, c.edges, s)
                            for c, s in zip(self.columns, self._merged, strict=True))
        return {k: v.copy() for k, v in self._base.items()}

    def commit(self) -> None:
        """Nothing outlives a round."""

    def state(self) -> dict[str, F64]:
        return {}

    def load_state(self, arrays: Mapping[str, npt.NDArray[np.float64]]) -> None:
        if arrays:
            raise ValueError(f"statistics keep no state across rounds; got {sorted(arrays)}")

    def export_state(self) -> tuple[F64, float, int,
                                    list[tuple[Hashable, float, list[tuple[int, int]]]]]:
        return to_flat(self._merged), float(self._contributors), self._contributors, []

    def import_state(self, acc: F64, total_weight: float, contributors: int,
                     parts: Sequence[tuple[Hashable, float, Sequence[tuple[int, int]]]]) -> None:
        self._merged = from_flat(np.asarray(acc, dtype=np.float64), self.columns)
        self._contributors = int(contributors)

    def partial(self) -> PartialSum:
        raise ProtocolError("statistics merge by Chan et al.'s rule, not as partial sums")

    def merge(self, p: PartialSum) -> None:
        raise ProtocolError("statistics merge by Chan et al.'s rule, not as partial sums")


class StatisticsTask:
    """Admission checks and result publishing of a statistics federation."""

    def __init__(self, strategy: StatisticsStrategy) -> None:
        self.strategy = strategy
        self.columns = strategy.columns

    def check(self, update: ModelUpdate) -> tuple[str, str]:
        """``("", "")`` for a contribution that fits the query, else (reason, detail)."""
        if update.chunks != 1:
            return "malformed", "a statistics contribution is one message, never chunks"
        if update.num_examples < 1:
            return "invalid_weight", f"num_examples {update.num_examples}"
        summaries, reason, detail = read_contribution(update.tensors, self.columns)
        return ("", "") if summaries is not None else (reason, detail)

    def publish(self, svc: AggregatorService, summary: RoundSummary) -> None:
        """Publish the closed round's result (retained), covering its accepted devices."""
        devices = tuple(sorted({device for device, _ in summary.accepted}))
        result = StatisticsResult(
            federation=svc.config.federation, round=summary.round, version=summary.version,
            devices=devices, columns=self.strategy.result, closed_by=summary.closed_by,
            run=svc.run, ts=svc._now())
        svc.publisher.result(result)
        log.info("round %d statistics from %d devices: %s", summary.round, len(devices),
                 "; ".join(f"{c.name} n={c.count}" + (f" mean={c.mean:.6g}" if c.count else "")
                           for c in result.columns))


def attach(svc: AggregatorService) -> StatisticsTask | None:
    """Turn a just-built service into a statistics one when ``[task] kind = "statistics"``
    (None otherwise, and nothing changes)."""
    config = svc.config
    if config.task.kind != "statistics":
        return None
    strategy = StatisticsStrategy(query_of(config.task))
    svc.model = placeholder_model()
    svc.spec = ModelSpec.from_weights(svc.model)
    svc.strategy = strategy
    # A contribution is not a delta: no norm bound, no clipping.
    svc.bound = NormBound(RobustConfig(mode="off"))
    svc.folder = BoundedFold(strategy, svc.bound, svc.stats,
                             max_examples=config.limits.max_examples, reject_mode=False)
    svc.limits = codec.DecodeLimits(
        max_payload_bytes=config.limits.max_update_bytes,
        max_tensors=len(FIELDS) * len(strategy.columns),
        max_elements=max(len(c.edges) + 1 for c in strategy.columns))
    return StatisticsTask(strategy)
