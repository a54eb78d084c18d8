"""Federated evaluation: the devices' reports on each model version, folded into example-weighted
means per version (pure logic: no sockets, no clock).

A device evaluates every new global model it receives on its held-out data and reports
(version, loss, accuracy, examples) in an ``Evaluation`` message. ``FederatedEvaluation`` keeps,
for the newest ``keep`` versions of the current run, the sums Σn·metric and Σn over the devices
that reported, one report per device and version (a resent report is a duplicate, not a second
vote). A report may arrive long after its version was published: it still counts for that
version, and the caller then updates that version's entry in the history.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedmq.wire import Evaluation, ModelEvaluation

__all__ = ["EVAL_REJECT_REASONS", "FederatedEvaluation", "VersionEval"]

#: Why a report is not counted (counted per reason, never raised).
EVAL_REJECT_REASONS: tuple[str, ...] = (
    "malformed", "wrong_device", "wrong_federation", "unknown_version", "duplicate",
    "invalid_weight",
)

#: Metric names longer than this, or more than this many per report, are not kept.
_MAX_METRICS = 16


@dataclass
class VersionEval:
    """The sums of one version's reports."""

    version: int
    examples: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    #: Σ n of the reports that carried each metric (a trainer may report more than another).
    weights: dict[str, int] = field(default_factory=dict)
    devices: set[str] = field(default_factory=set)

    def means(self) -> dict[str, float]:
        """``eval_<metric>`` = Σ n·metric / Σ n for every metric reported, plus the counts."""
        out = {f"eval_{k}": v / self.weights[k] for k, v in sorted(self.sums.items())}
        out["eval_examples"] = float(self.examples)
        out["eval_devices"] = float(len(self.devices))
        return out


class FederatedEvaluation:
    """Example-weighted means of the devices' evaluations, per model version."""

    def __init__(self, federation: str, *, max_examples: int, keep: int = 32) -> None:
        self.federation = federation
        self.max_examples = max_examples
        self.keep = keep
        self.run = 0
        self.current = 0  # the newest published version
        self.versions: dict[int, VersionEval] = {}

    def published(self, run: int, version: int) -> None:
        """A model version was published (a new run forgets the old run's versions)."""
        if run != self.run:
            self.versions.clear()
            self.run = run
        self.current = version
        for old in [v for v in self.versions if v <= version - self.keep]:
            del self.versions[old]

    def restore(self, version: int, metrics: Mapping[str, float]) -> None:
        """Rebuild a version's sums from its stored means (after a restart)."""
        n = int(metrics.get("eval_examples", 0))
        if n <= 0:
            return
        entry = VersionEval(version, examples=n)
        for key, value in metrics.items():
            if key.startswith("eval_") and key not in ("eval_examples", "eval_devices"):
                entry.sums[key.removeprefix("eval_")] = value * n
                entry.weights[key.removeprefix("eval_")] = n
        self.versions[version] = entry

    def add(self, report: Evaluation, device: str) -> tuple[VersionEval | None, str]:
        """Count one report from ``device`` (the topic's id); returns the version's updated
        entry, or None and the reason it was not counted."""
        if report.federation != self.federation:
            return None, "wrong_federation"
        if report.device_id != device:
            return None, "wrong_device"
        if (report.run and report.run != self.run) or not (
                0 <= report.version <= self.current
                and report.version > self.current - self.keep):
            return None, "unknown_version"
        if report.num_examples < 1:
            return None, "invalid_weight"
        values = {k: float(v) for k, v in report.metrics.items()
                  if len(k) <= 32 and math.isfinite(v)}
        if not values or len(values) > _MAX_METRICS:
            return None, "malformed"
        entry = self.versions.setdefault(report.version, VersionEval(report.version))
        if device in entry.devices:
            return None, "duplicate"
        # The same cap as updates: one device's report weighs at most max_examples.
        n = min(report.num_examples, self.max_examples)
        entry.devices.add(device)
        entry.examples += n
        for key, value in values.items():
            entry.sums[key] = entry.sums.get(key, 0.0) + n * value
            entry.weights[key] = entry.weights.get(key, 0) + n
        return entry, ""

    def message(self, entry: VersionEval, now: float) -> ModelEvaluation:
        """The ``ModelEvaluation`` to publish for ``entry``."""
        return ModelEvaluation(federation=self.federation, version=entry.version,
                               devices=len(entry.devices), num_examples=entry.examples,
                               metrics=entry.means(), run=self.run, ts=now)

    def latest(self) -> VersionEval | None:
        """The newest version with at least one report."""
        return self.versions[max(self.versions)] if self.versions else None
