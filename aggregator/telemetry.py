"""What the aggregator tells dashboards between rounds, on MQTT: the federated evaluation of each
model version (from the devices' ``Evaluation`` reports) and the open round's progress.

Both are retained and rate-limited (at most one message per ``EVERY_S`` each), so a thousand
devices reporting within a second cost one publish, not a thousand. The clock is an argument:
the worker calls ``tick(now, ...)``; nothing here runs on its own thread.
"""

from __future__ import annotations

import logging

from aggregator.evaluation import FederatedEvaluation, VersionEval
from aggregator.ledger import Stats
from aggregator.publishing import Publisher
from fedmq import codec
from fedmq.errors import DecodeError
from fedmq.wire import Evaluation, RoundProgress

__all__ = ["EVERY_S", "Telemetry"]

log = logging.getLogger("aggregator.service")

#: Least time between two messages of one kind (evaluation, progress).
EVERY_S = 1.0

#: An evaluation report is a few hundred bytes; anything much larger is not one.
_EVAL_LIMITS = codec.DecodeLimits(max_payload_bytes=16 * 1024, max_tensors=1, max_elements=1,
                                  max_entries=32)


class Telemetry:
    """Federated evaluation and round progress, published when they change."""

    def __init__(self, federation: str, publisher: Publisher, stats: Stats, *,
                 max_examples: int) -> None:
        self.federation = federation
        self.publisher = publisher
        self.stats = stats
        self.evaluation = FederatedEvaluation(federation, max_examples=max_examples)
        self._dirty: set[int] = set()
        self._eval_sent_at = -float("inf")
        #: Reports expected per version (the last round's participants): a version all of
        #: them have reported on is published at once instead of at the next interval.
        self.expected = 0
        self._complete = False
        self._progress: tuple[object, ...] | None = None
        self._progress_sent_at = -float("inf")

    # ---------------------------------------------------------------- evaluation

    def report(self, payload: bytes, device: str | None) -> None:
        """One message from ``eval/{device}``: counted, or not counted with a reason."""
        if device is None:
            self.stats.eval_rejected["wrong_device"] += 1
            return
        try:
            report = codec.decode_as(payload, Evaluation, _EVAL_LIMITS)
        except DecodeError:
            self.stats.eval_rejected["malformed"] += 1
            return
        entry, reason = self.evaluation.add(report, device)
        if entry is None:
            self.stats.eval_rejected[reason] += 1
            log.debug("evaluation report from %s on version %d not counted: %s", device,
                      report.version, reason)
            return
        self.stats.eval_reports += 1
        self._dirty.add(entry.version)
        if self.expected and len(entry.devices) >= self.expected:
            self._complete = True

    def expect(self, participants: int, previous: int) -> None:
        """How many reports the next version should get: its round's participants, or as many
        devices as scored the ``previous`` version (evaluation-only devices train nothing)."""
        before = self.evaluation.versions.get(previous)
        self.expected = max(participants, len(before.devices) if before else 0)

    def published(self, run: int, version: int) -> None:
        """A model version went out: reports on it count from now on."""
        self.evaluation.published(run, version)

    def restore(self, version: int, metrics: dict[str, float]) -> None:
        """Take a version's stored evaluation back (after a restart), so later reports add
        to it instead of starting over."""
        self.evaluation.restore(version, metrics)

    def evaluated(self, version: int) -> VersionEval | None:
        """``version``'s reports so far (None: none yet)."""
        return self.evaluation.versions.get(version)

    def flush(self, now: float, force: bool = False) -> None:
        """Publish (and log) the versions whose evaluation changed, at most every ``EVERY_S``."""
        if not self._dirty or (not (force or self._complete)
                               and now - self._eval_sent_at < EVERY_S):
            return
        self._eval_sent_at = now
        self._complete = False
        for version in sorted(self._dirty):
            entry = self.evaluation.versions.get(version)
            if entry is None:  # pruned meanwhile (a new run)
                continue
            message = self.evaluation.message(entry, now)
            self.publisher.model_eval(message)
            m = message.metrics
            shown = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in m.items()
                              if k not in ("eval_examples", "eval_devices"))
            log.info("model version %d evaluated by %d devices on %d held-out examples: %s",
                     version, message.devices, message.num_examples, shown)
        self._dirty.clear()

    # ---------------------------------------------------------------- progress

    def progress(self, now: float, *, round_: int, base_version: int, accepted: int,
                 min_updates: int, max_updates: int, deadline: float | None,
                 rejected: dict[str, int], run: int) -> None:
        """Publish the open round's progress if it changed (at most every ``EVERY_S``)."""
        state = (run, round_, base_version, accepted, deadline, tuple(sorted(rejected.items())))
        if state == self._progress or now - self._progress_sent_at < EVERY_S:
            return
        self._progress = state
        self._progress_sent_at = now
        self.publisher.progress(RoundProgress(
            federation=self.federation, round=round_, base_version=base_version,
            accepted=accepted, min_updates=min_updates, max_updates=max_updates,
            deadline=deadline if deadline is not None else 0.0, rejected=dict(rejected),
            run=run, ts=now))
