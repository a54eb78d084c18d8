"""The aggregator's counters: ``Stats`` since start, and ``RoundLedger``, one round's
bookkeeping besides its sums (what its summary reports, and what a mid-round snapshot must carry
to rebuild it: events, rejections, bytes, weighted device metrics, clips)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RoundLedger", "Stats"]


@dataclass
class RoundLedger:
    """Counts of the open round; a new one for every round."""

    #: What the round machine saw, in order: ``["u", device, update_id, now]`` for an accepted
    #: update, ``["t", now]`` for a tick that extended the round.
    events: list[list[Any]] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    bytes_in: int = 0
    #: Weighted sums of the devices' metrics, and the weight behind them.
    metric_sums: dict[str, float] = field(default_factory=dict)
    metric_weight: float = 0.0
    #: Accepted updates scaled down to the norm bound.
    clipped: int = 0

    def add_metrics(self, values: Mapping[str, float], weight: float) -> None:
        """Add one accepted update's metrics, weighted like its update."""
        self.metric_weight += weight
        for key, value in values.items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + weight * value

    def mean_metrics(self) -> dict[str, float]:
        """The weighted mean of each metric over the round's accepted updates."""
        w = self.metric_weight
        return {k: v / w for k, v in self.metric_sums.items()} if w else {}

    def export(self) -> dict[str, Any]:
        """The ledger as JSON-ready values, for a mid-round snapshot."""
        return {"events": self.events, "rejected": dict(self.rejected), "bytes": self.bytes_in,
                "metrics": self.metric_sums, "metric_weight": self.metric_weight,
                "clipped": self.clipped}

    @classmethod
    def restore(cls, saved: Mapping[str, Any]) -> RoundLedger:
        """Rebuild what ``export`` gave (snapshots written before clipping existed: 0 clips)."""
        return cls(events=[list(ev) for ev in saved["events"]],
                   rejected=Counter(saved["rejected"]), bytes_in=int(saved["bytes"]),
                   metric_sums=dict(saved["metrics"]),
                   metric_weight=float(saved["metric_weight"]),
                   clipped=int(saved.get("clipped", 0)))


@dataclass
class Stats:
    """Counters since start (read them from any thread; only the worker writes)."""

    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    bytes_in: int = 0
    rounds_completed: int = 0
    fold_seconds: float = 0.0
    #: ``time.perf_counter()`` when the latest fold finished (0.0 before the first).
    last_fold_at: float = 0.0
    #: The latest rejection, with what was wrong (for logs and operators).
    last_rejection: str = ""
    #: Accepted updates scaled down to the norm bound.
    clipped: int = 0
    #: Rounds whose result was dropped unpublished, by reason (``ABANDON_REASONS``).
    abandoned: Counter[str] = field(default_factory=Counter)
    #: Devices' evaluation reports counted, and those not counted by reason
    #: (``aggregator.evaluation.EVAL_REJECT_REASONS``; not update rejections).
    eval_reports: int = 0
    eval_rejected: Counter[str] = field(default_factory=Counter)
