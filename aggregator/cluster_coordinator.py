"""The scale-out coordinator (``[cluster] role = "coordinator"``; docs/scaling.md): the single
aggregator's rounds, without the updates.

It announces rounds and publishes models exactly as ``AggregatorService`` does, and runs the same
round machine, fed from its workers' progress reports instead of from updates: each
``(device, update_id)`` a worker reports accepted and durable is offered to the machine, so
quorum, grace, deadline, extensions and abandonment follow ``[rounds]`` unchanged. When the
machine closes the round, the coordinator publishes a retained ``CollectRequest`` and waits for
every configured worker's ``WorkerPartial``; it merges them in worker-name order into the
strategy, whose ``finalize`` (server optimizer, change bound) runs once, on the merged sum.

A worker accepts updates until the collect reaches it, so a round may hold a few more updates
than the machine counted (those in flight then); the model is always the average of exactly the
updates in the partials, and the summary lists those.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt

from aggregator import closing
from aggregator.rounds import (
    Accept,
    Action,
    CloseRound,
    ExtendDeadline,
    Reject,
    UpdateOffered,
)
from aggregator.service import AggregatorService
from aggregator.strategies import PartialSum
from fedmq import cluster_wire
from fedmq.config import AggregatorConfig
from fedmq.errors import DecodeError
from fedmq.transport import Message, Transport
from fedmq.wire import ModelUpdate

log = logging.getLogger(__name__)

#: Collect requests are repeated this many ``progress_interval_s`` apart while partials are
#: missing (a worker that was down answers the retained one when it comes back anyway).
RECOLLECT = 25
#: A resend request is repeated at most this many ``progress_interval_s`` apart.
RESEND = 5


class CoordinatorService(AggregatorService):
    """Owns the rounds of a federation whose updates its workers fold."""

    def __init__(self, config: AggregatorConfig, transport: Transport | None = None, *,
                 clock: Callable[[], float] = time.time,
                 weights: Mapping[str, npt.NDArray[np.float32]] | None = None) -> None:
        super().__init__(config, transport, clock=clock, weights=weights)
        self.workers = tuple(sorted(config.cluster.workers))
        #: Per worker, how many of its round's accepted updates were offered to the machine.
        self._seen: dict[str, int] = {}
        #: When each worker was last asked to report its round again (``_ask_resend``).
        self._resend_asked: dict[str, float] = {}
        #: The round's partials by worker (kept from before the collect too: a worker answers a
        #: retained request while a restarted coordinator is still re-counting).
        self._partials: dict[str, cluster_wire.WorkerPartial] = {}
        self._collecting: str | None = None  # closed_by, while waiting for partials
        self._collect_sent = 0.0
        self._accepted_pairs: tuple[tuple[str, str], ...] = ()
        #: Workers heard from (any report: the worker is subscribed to its shard).
        self._ready: set[str] = set()
        #: A fresh run's first round, waiting for every worker's first report.
        self._first_round_waiting = False

    def _subscribe(self) -> None:
        self.transport.subscribe(self.topics.worker_progresses, qos=1)
        self.transport.subscribe(self.topics.partials, qos=1)
        self.transport.subscribe(self.topics.evals, qos=1)
        self.transport.subscribe(self.topics.statuses, qos=1)

    def round_accepted(self) -> tuple[tuple[str, str], ...]:
        return self._accepted_pairs

    # ------------------------------------------------------------ messages

    def _handle(self, msg: Message) -> None:
        worker = self.topics.worker_of(msg.topic)
        if worker is None:
            super()._handle(msg)  # statuses and evaluations, as the single aggregator
            return
        if worker not in self.workers:
            log.warning("message from worker %r, which is not in [cluster] workers: ignored",
                        worker)
            return
        try:
            m = cluster_wire.decode(msg.payload)
        except DecodeError as exc:
            log.warning("unreadable message from worker %s ignored (%s)", worker, exc)
            return
        if getattr(m, "worker", None) != worker or m.federation != self.config.federation:
            return
        if isinstance(m, cluster_wire.WorkerProgress) and worker not in self._ready:
            self._ready.add(worker)
            if self._first_round_waiting and self._ready.issuperset(self.workers):
                log.info("every worker has reported: opening round 1")
                self._open_round(self._now())
        if m.run != self.run or m.round != self.round:
            return  # another round's (an old one, or one this coordinator has not opened)
        if isinstance(m, cluster_wire.WorkerProgress):
            self._progress(m)
        elif isinstance(m, cluster_wire.WorkerPartial):
            self._partials[worker] = m
            self._try_merge()

    def _progress(self, p: cluster_wire.WorkerProgress) -> None:
        seen = self._seen.get(p.worker, 0)
        now = self._now()
        if p.first > seen:  # reports this coordinator never saw (it restarted): ask again
            self._ask_resend(p.worker, seen)
            return
        end = p.first + len(p.accepted)
        for i in range(seen, end):
            device, update_id = p.accepted[i - p.first]
            offer = UpdateOffered(device_id=device, round=p.round, base_version=p.base_version,
                                  update_id=update_id, now=now)
            actions = self.machine.handle(offer)
            # The norm bound's estimate is computed here only, from every worker's norms
            # (before a close the same offer may trigger: the collect carries the estimate).
            if p.norms and any(isinstance(a, Accept) for a in actions) \
                    and self.bound.observe(p.norms[i - p.first]):
                self._publish_estimate()
            self._apply(actions, None)
        self._seen[p.worker] = max(seen, end)

    def _ask_resend(self, worker: str, first: int) -> None:
        """Ask ``worker`` to report its round from ``first`` (at most every ``RESEND``
        progress intervals: the reports in between show the same gap)."""
        now = self.clock()
        if now - self._resend_asked.get(worker, -math.inf) \
                < RESEND * self.config.cluster.progress_interval_s:
            return
        self._resend_asked[worker] = now
        log.info("round %d: asking worker %s to report its updates again from #%d",
                 self.round, worker, first)
        req = cluster_wire.ResendRequest(federation=self.config.federation, worker=worker,
                                         run=self.run, round=self.round, first=first, ts=now)
        self.transport.publish(self.topics.worker_resend(worker), cluster_wire.encode(req),
                               qos=1)

    def _estimate(self) -> float | None:
        b = self.bound
        return b.estimate if b.active and b.adaptive else None

    def _publish_estimate(self) -> None:
        """Tell the workers the estimate their round's updates are clipped with (retained)."""
        if not (self.bound.active and self.bound.adaptive):
            return  # a fixed bound or none: workers need nothing from here
        msg = cluster_wire.NormEstimate(federation=self.config.federation, run=self.run,
                                        round=self.round, estimate=self._estimate(),
                                        ts=self.clock())
        self.transport.publish(self.topics.estimate, cluster_wire.encode(msg), qos=1,
                               retain=True)

    def _announce(self, deadline: float, open_: bool = True) -> None:
        self._publish_estimate()  # first: a worker that has it when the round opens folds at once
        super()._announce(deadline, open_)

    def _apply(self, actions: list[Action],
               offered: tuple[ModelUpdate, float, float] | None) -> None:
        for action in actions:
            match action:
                case Accept(device_id=device, update_id=update_id):
                    self.stats.accepted += 1
                    self.ledger.events.append(["u", device, update_id, self._now(),
                                               self.version])
                case Reject(device_id=dev, update_id=uid, reason=reason):
                    # Counted by the worker that folded it; here only if two workers hold it.
                    log.warning("device %s's update %s reported by two workers (%s)", dev, uid,
                                reason)
                case CloseRound(closed_by=closed_by):
                    self._collect(closed_by)
                case ExtendDeadline():
                    # A clustered broker can miss a retained message for a client that
                    # subscribes within milliseconds of its publication (measured on NATS:
                    # docs/scaling.md): below quorum, give such devices the model and the
                    # round again before the extended announcement.
                    self.publisher.republish()
                    super()._apply([action], offered)
                case _:
                    super()._apply([action], offered)

    # ------------------------------------------------------------ closing

    def _collect(self, closed_by: str) -> None:
        if self.bound.bootstrapping:  # the estimate starts from the norms that came in
            self.bound.start()
            self._publish_estimate()
        self._collecting = closed_by
        self._send_collect()
        log.info("round %d closed by %s with %d updates reported: collecting the partials of "
                 "%s", self.round, closed_by, self.machine.accepted, ", ".join(self.workers))
        self._try_merge()

    def _send_collect(self) -> None:
        req = cluster_wire.CollectRequest(
            federation=self.config.federation, run=self.run, round=self.round,
            base_version=self.version, workers=self.workers, ts=self.clock(),
            estimate=self._estimate())
        self.transport.publish(self.topics.collect, cluster_wire.encode(req), qos=1,
                               retain=True)
        self._collect_sent = self.clock()

    def _try_merge(self) -> None:
        if self._collecting is None or any(w not in self._partials for w in self.workers):
            return
        parts = [self._partials[w] for w in self.workers]
        pairs = [pair for p in parts for pair in p.contributors]
        devices = [d for d, _ in pairs]
        if len(set(devices)) != len(devices):
            # Two workers folded the same device's update (a device on two sites): the merged
            # sum would count it twice, so the round's result is dropped.
            closing.abandon(self, "overlapping_partials",
                            f"{len(devices) - len(set(devices))} devices in two partials",
                            self._now())
            return
        closed_by = self._collecting
        self._collecting = None
        for p in parts:
            self.strategy.merge(PartialSum(p.weighted_sum, p.total_weight, len(p.contributors)))
            self.ledger.bytes_in += p.bytes_in
            self.ledger.clipped += p.clipped
            self.stats.clipped += p.clipped
            for reason, n in p.rejected.items():
                self.ledger.rejected[reason] += n
        self._accepted_pairs = tuple(pairs)
        self._close_round(closed_by)

    def _open_round(self, now: float, snapshot: bool = True) -> None:
        if self.round == 0 and self._replay_now is None \
                and not self._ready.issuperset(self.workers):
            # A fresh run. The engine hands a QoS 1 update only to sessions subscribed when it
            # arrives: one routed to the shard of a worker that has never subscribed is dropped
            # although the device got its PUBACK. So round 1 waits for every worker's report
            # (a worker not in a run yet sends a heartbeat).
            if not self._first_round_waiting:
                log.info("round 1 waits for the first report of %s",
                         ", ".join(w for w in self.workers if w not in self._ready))
            self._first_round_waiting = True
            return
        self._first_round_waiting = False
        self._seen, self._resend_asked = {}, {}
        self._partials = {}
        self._collecting = None
        self._accepted_pairs = ()
        super()._open_round(now, snapshot)

    def _tick(self) -> None:
        super()._tick()
        if (self._collecting is not None and self._replay_now is None
                and self.clock() - self._collect_sent
                >= RECOLLECT * self.config.cluster.progress_interval_s):
            missing = [w for w in self.workers if w not in self._partials]
            log.info("round %d: waiting for the partials of %s", self.round, ", ".join(missing))
            self._send_collect()
