"""A scale-out worker (``[cluster] role = "worker"``; docs/scaling.md): the single aggregator's
update path for one shard of the devices, without the rounds.

It folds its shard's updates with the same admission checks, kernels, strategy, write-ahead log
and acknowledge-after-sync as ``AggregatorService``; the coordinator owns the rounds. The worker
follows the coordinator's retained announcement (opening the round it names), reports what it
has accepted and made durable (``WorkerProgress``), and when the coordinator collects the round
(``CollectRequest``) closes it and sends its share (``WorkerPartial``), again on every repeated
request until the next round opens. An update that arrives before the announcement of its round
(the two travel different paths through a clustered broker) is held unacknowledged until that
round opens, so a crash meanwhile loses nothing: the broker delivers it again.

An edge gateway is the same worker on a site's own broker, with ``[cluster] upstream`` naming
the coordinator's: announcements, the model and collect requests come down (the retained model
and announcement are relayed to the site's devices), progress and the partial go up.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt

from aggregator import checkpoint, kernels
from aggregator.exporter import Exporter
from aggregator.privacy import norm_config
from aggregator.robust import SharedBound
from aggregator.rounds import CloseRequested, RoundMachine, RoundRules
from aggregator.service import AggregatorService
from aggregator.startup import inbox_bytes
from aggregator.wal import COLLECT, ESTIMATE
from fedmq import cluster_wire, codec
from fedmq.config import AggregatorConfig
from fedmq.errors import ConfigError, DecodeError
from fedmq.transport import Message, PahoTransport, Transport
from fedmq.wire import ModelUpdate, RoundAnnouncement

log = logging.getLogger(__name__)

#: A worker's own round never closes by count or time: only its coordinator closes it.
_NEVER = RoundRules(min_updates=1 << 62, max_updates=1 << 62, deadline_s=1e15, grace_s=0.0)
#: Updates for a round not yet announced here, held unacknowledged (beyond: rejected).
MAX_EARLY = 20_000
#: A progress report goes out at least every this many ``progress_interval_s`` (a heartbeat).
HEARTBEATS = 10


def _upstream_broker(config: AggregatorConfig) -> AggregatorConfig:
    host, _, port = config.cluster.upstream.rpartition(":")
    # The site's failover nodes are not the coordinator's.
    return dataclasses.replace(config, broker=dataclasses.replace(
        config.broker, host=host, port=int(port), failover=[]))


class WorkerService(AggregatorService):
    """Folds one shard's updates for a coordinator (``aggregator.cluster_coordinator``)."""

    def __init__(self, config: AggregatorConfig, transport: Transport | None = None, *,
                 upstream: Transport | None = None,
                 clock: Callable[[], float] = time.time,
                 weights: Mapping[str, npt.NDArray[np.float32]] | None = None) -> None:
        c = config.cluster
        self.name = c.name
        durable = config.durability.state_dir is not None
        if transport is None:
            from aggregator.startup import initial_weights

            base = dict(weights) if weights is not None else initial_weights(config)
            size = sum(int(np.asarray(v).size) for v in base.values())
            transport = PahoTransport(
                config.broker, client_id=f"fedmq-worker-{config.federation}-{c.name}",
                manual_ack=durable, inbox_bytes=inbox_bytes(size),
                session_expiry_s=config.durability.session_expiry_s if durable else 0)
            weights = base
        if upstream is None and c.upstream:
            up = _upstream_broker(config)
            # Retained control messages come again after every reconnect: no manual ack.
            upstream = PahoTransport(
                up.broker, client_id=f"fedmq-gateway-{config.federation}-{c.name}")
        super().__init__(config, transport, clock=clock, weights=weights)
        self.upstream = upstream
        self.machine = RoundMachine(_NEVER)
        # The adaptive norm estimate is the coordinator's (one estimate from every shard).
        self.shared = SharedBound(norm_config(config), 1)
        self.bound = self.folder.bound = self.shared
        #: An estimate for a round this worker has not opened yet (it came first).
        self._next_estimate: cluster_wire.NormEstimate | None = None
        #: Updates of a round not announced yet (unacknowledged until it opens), by packet id
        #: (0, as a transport without ids gives: by object).
        self._early: dict[int, Message] = {}
        self._collected: cluster_wire.WorkerPartial | None = None
        self._sent_accepted = -1
        self._sent_collected = False
        self._sent_at = 0.0
        #: The next report starts at this index of the round's accepted updates.
        self._report_from = 0
        self._relay: threading.Thread | None = None
        #: Held updates offered since the last acknowledgements.
        self._released: list[Message] = []

    # ------------------------------------------------------------ lifecycle

    @property
    def control(self) -> Transport:
        """Where the coordinator is: upstream for an edge gateway, else the same broker."""
        return self.upstream if self.upstream is not None else self.transport

    def _subscribe(self) -> None:
        c = self.config.cluster
        self.transport.subscribe(self.topics.shard_updates(c.shard) if c.shards
                                 else self.topics.updates, qos=1)
        self.control.subscribe(self.topics.round, qos=1)
        self.control.subscribe(self.topics.collect, qos=1)
        self.control.subscribe(self.topics.estimate, qos=1)
        self.control.subscribe(self.topics.worker_resend(self.name), qos=1)
        if self.upstream is not None:  # relayed to the site's devices
            self.upstream.subscribe(self.topics.model, qos=1)
            self.upstream.subscribe(self.topics.model_parts, qos=1)

    def start(self, connect_timeout: float = 30.0) -> None:
        """Connect (and upstream), recover the log, then follow the coordinator's rounds."""
        kernels.warmup()
        kernels.set_fold_threads(self.config.strategy.fold_threads)
        self._subscribe()
        self.transport.start()
        if self.upstream is not None:
            self.upstream.start()
        for t, where in ((self.transport, self.config.broker),) + (
                ((self.upstream, _upstream_broker(self.config).broker),)
                if self.upstream is not None else ()):
            if not t.wait_connected(connect_timeout):
                self.stop()
                error = getattr(t, "last_error", None)  # PahoTransport's, if any
                raise ConnectionError(f"worker {self.name} could not connect to the broker at "
                                      f"{where.host}:{where.port} within "
                                      f"{connect_timeout:.0f} s; check [broker] and [cluster] "
                                      "upstream in the config and that the broker runs"
                                      + (f" (last error: {error})" if error else ""))
        if checkpoint.recover(self):
            log.info("worker %s recovered round %d of run %d", self.name, self.round, self.run)
        else:
            log.info("worker %s waiting for the coordinator's round announcement on %s",
                     self.name, self.topics.round)
        self._reconnected.clear()
        if self.upstream is not None:
            self._relay = threading.Thread(target=self._relay_down, name="worker-relay",
                                           daemon=True)
            self._relay.start()
        self._worker = threading.Thread(target=self._work, name="worker-fold", daemon=True)
        self._worker.start()
        if self.config.metrics.listen:  # its own counters: accepted, rejected, clipped, bytes
            exporter = Exporter(self, self.config.metrics.listen, worker_alive=lambda: (
                (w := self._worker) is not None and w.is_alive()))
            try:
                exporter.start()
            except ConfigError:
                self.stop()
                raise
            self.exporter = exporter
        log.info("worker %s of federation %r started (%s)", self.name, self.config.federation,
                 f"shard {self.config.cluster.shard} of {self.config.cluster.shards}"
                 if self.config.cluster.shards else "every update on its broker")

    def stop(self) -> None:
        super().stop()
        if self.upstream is not None:
            self.upstream.stop()
        if self._relay is not None:
            self._relay.join(timeout=5)

    def _relay_down(self) -> None:
        """Edge gateway: the coordinator's messages into the fold queue (as QoS 0, so they are
        never acknowledged on the site's connection), and its retained model and announcement
        onto the site's broker for the devices."""
        assert self.upstream is not None
        inbox = self.upstream.inbox
        relayed = (self.topics.round, self.topics.model, f"{self.topics.model}/part/")
        while not self._stopping.is_set():
            try:
                msg = inbox.get(timeout=0.5)
            except Exception:  # queue.Empty
                continue
            if msg.topic.startswith(relayed):
                self.transport.publish(msg.topic, msg.payload, qos=1, retain=True)
            if msg.topic in (self.topics.round, self.topics.collect, self.topics.estimate):
                self.transport.inbox.put(Message(msg.topic, msg.payload, qos=0))

    # ------------------------------------------------------------ the fold path

    def step(self, *msgs: Message) -> None:
        """As the single aggregator's, but updates held for a round not announced yet are not
        acknowledged until they are offered (and logged); then report durable progress."""
        for msg in msgs:
            self._handle(msg)
        self._flush()
        if self.wal is not None:
            self.wal.sync()
        parked = {id(m) for m in self._early.values()}
        # Each message is acknowledged exactly once: a second PUBACK for a packet id that the
        # broker has reused would acknowledge another message.
        for msg in [m for m in msgs if id(m) not in parked] + [
                m for m in self._released if all(m is not x for x in msgs)]:
            self.transport.ack(msg)
        self._released = []
        if checkpoint.due(self):
            checkpoint.save(self, self._round_opened, mid=True)
        self._tick()

    def _handle(self, msg: Message) -> None:
        t = self.topics
        if msg.topic == t.round:
            self._on_announcement(msg.payload)
            return
        if msg.topic == t.collect:
            self._on_collect(msg.payload, replay=False)
            return
        if msg.topic == t.estimate:
            self._on_estimate(msg.payload, replay=False)
            return
        if msg.topic == t.worker_resend(self.name):
            self._on_resend(msg.payload)
            return
        canonical = t.canonical_update(msg.topic)
        plain = msg if canonical is None else Message(
            canonical, msg.payload, qos=msg.qos, retain=msg.retain, mid=msg.mid)
        # Held as received: the step acknowledges messages by identity.
        if plain.topic.startswith(f"{t.base}/update/") and self._early_for_later(msg):
            return
        super()._handle(plain)

    def _early_for_later(self, msg: Message) -> bool:
        """Hold an update made for a later round (or another run) than the one open here: its
        round's announcement has not reached this worker yet."""
        if self._replay_now is not None or len(self._early) >= MAX_EARLY:
            return False  # the log holds only updates accepted in their round
        try:
            update = codec.decode_as(msg.payload, ModelUpdate, self.limits)
        except DecodeError:
            return False  # the normal path rejects it with its reason
        if self.run != 0 and ((update.run in (0, self.run) and update.round <= self.round)
                              or (update.run not in (0, self.run) and self._collected is None)):
            # An open round's (or an old one's) update; another run's while this one is open is
            # stale (the normal path says so); once collected, the next run may be coming.
            return False
        # The engine redelivers a message still unacknowledged after its ack wait (or after a
        # reconnect) on its original packet id: one copy is kept, so one PUBACK goes out for it
        # (a second could acknowledge another message the broker has since sent on that id).
        self._early.pop(msg.mid or -id(msg), None)
        self._early[msg.mid or -id(msg)] = msg
        return True

    def _on_resend(self, payload: bytes) -> None:
        """The coordinator missed reports (it restarted): report again from ``first``."""
        try:
            req = cluster_wire.decode(payload)
        except DecodeError as exc:
            log.warning("worker %s: unreadable resend request ignored (%s)", self.name, exc)
            return
        if not isinstance(req, cluster_wire.ResendRequest) or req.worker != self.name \
                or (req.run, req.round) != (self.run, self.round) \
                or req.federation != self.config.federation:
            return  # another round's: the next round's reports start at 0 anyway
        self._report_from = min(self._report_from, req.first)
        self._sent_accepted = -1  # a change: sent within progress_interval_s

    def _on_announcement(self, payload: bytes) -> None:
        try:
            ann = codec.decode_as(payload, RoundAnnouncement)
        except DecodeError as exc:
            log.warning("worker %s: unreadable round announcement ignored (%s)", self.name, exc)
            return
        if ann.federation != self.config.federation or not ann.open:
            return
        if ann.run == self.run and ann.round <= self.round:
            return  # the open round again (an extension) or an old one
        self._open_at(ann.run, ann.round, ann.base_version)

    def _open_at(self, run: int, round_: int, base_version: int) -> None:
        """Open the coordinator's round ``round_`` (rounds can be skipped: abandoned ones)."""
        self.run, self.version = run, base_version
        self.round = round_ - 1
        self.machine = RoundMachine(_NEVER)
        self._collected = None
        self._sent_accepted, self._report_from = -1, 0
        self._open_round(self._now())
        log.info("worker %s: round %d open on model version %d", self.name, round_, base_version)
        early, self._early = list(self._early.values()), {}
        for m in early:  # offered now, logged, and acknowledged after this step's sync
            self._handle(m)
        self._released.extend(early)

    def _open_round(self, now: float, snapshot: bool = True) -> None:
        self.machine = RoundMachine(_NEVER)  # a fresh round: OpenRound needs a rising number
        if self._replay_now is None:
            self.shared.forget()  # restored from the snapshot instead while recovering
        super()._open_round(now, snapshot)
        nxt = self._next_estimate
        if nxt is not None and (nxt.run, nxt.round) == (self.run, self.round):
            self._next_estimate = None
            self._on_estimate(cluster_wire.encode(nxt), replay=False)

    def _on_estimate(self, payload: bytes, *, replay: bool) -> None:
        """The coordinator's norm estimate: for the open round, fold what waited for it."""
        try:
            msg = cluster_wire.decode(payload)
        except DecodeError as exc:
            log.warning("worker %s: unreadable norm estimate ignored (%s)", self.name, exc)
            return
        if not isinstance(msg, cluster_wire.NormEstimate) or \
                msg.federation != self.config.federation:
            return
        if (msg.run, msg.round) != (self.run, self.round):
            if msg.run != self.run or msg.round > self.round:
                self._next_estimate = msg  # its round's announcement has not come yet
            return
        self._use_estimate(msg.estimate, payload, replay=replay)

    def _use_estimate(self, estimate: float | None, payload: bytes, *, replay: bool) -> None:
        if self.shared.apply(estimate):
            if self.wal is not None and not replay:
                self.wal.append(ESTIMATE, self._now(), "", payload)
            self._flush(release=True)

    def _accepted(self, update: ModelUpdate, weight: float, sq: float) -> None:
        super()._accepted(update, weight, sq)
        # The norm rides with the accepted pair to the coordinator, whose estimate it feeds.
        self.ledger.events[-1].append(math.sqrt(sq))

    def _on_collect(self, payload: bytes, *, replay: bool) -> None:
        try:
            req = cluster_wire.decode(payload)
        except DecodeError as exc:
            log.warning("worker %s: unreadable collect request ignored (%s)", self.name, exc)
            return
        if not isinstance(req, cluster_wire.CollectRequest) or \
                req.federation != self.config.federation or self.name not in req.workers:
            return
        if req.run == self.run and req.round < self.round:
            return  # an old round's request (retained): already answered
        if req.run != self.run or req.round > self.round:
            # Its announcement never reached this worker (it was down): open it to answer.
            self._open_at(req.run, req.round, req.base_version)
        if self._collected is None:
            if self.bound.bootstrapping and req.estimate is not None:
                # The estimate the coordinator closed with (it may not have arrived alone).
                self.bound.estimate = req.estimate
                self._flush(release=True)
            self._flush(closing=True)
            self.machine.handle(CloseRequested(self.round))
            if self.wal is not None and not replay:
                self.wal.append(COLLECT, self._now(), "", payload)
                self.wal.sync()
            self._collected = self._partial()
            log.info("worker %s: round %d collected, %d updates", self.name, self.round,
                     len(self._collected.contributors))
        if not replay:
            self.control.publish(self.topics.partial(self.name),
                                 cluster_wire.encode(self._collected), qos=1)

    def replay_record(self, kind: int, topic: str, payload: bytes) -> None:
        if kind == COLLECT:
            self._on_collect(payload, replay=True)
        elif kind == ESTIMATE:
            self._on_estimate(payload, replay=True)

    def _partial(self) -> cluster_wire.WorkerPartial:
        s = self.strategy
        if s.incomplete:
            acc, total_weight, _contributors, _ = s.export_state()
            log.warning("worker %s: round %d collected with %d chunked updates incomplete",
                        self.name, self.round, s.incomplete)
        else:
            p = s.partial()
            acc, total_weight = p.weighted_sum, p.total_weight
        return cluster_wire.WorkerPartial(
            federation=self.config.federation, worker=self.name, run=self.run,
            round=self.round, base_version=self.version, weighted_sum=acc,
            total_weight=total_weight, contributors=self.machine.accepted_ids,
            rejected=dict(self.ledger.rejected), bytes_in=self.ledger.bytes_in, ts=self.clock(),
            clipped=self.ledger.clipped)

    # ------------------------------------------------------------ what a worker does not do

    def _announce(self, deadline: float, open_: bool = True) -> None:
        """The coordinator announces rounds."""

    def _publish_model(self, metrics: Mapping[str, float]) -> None:
        """The coordinator publishes models."""

    def _close_round(self, closed_by: str) -> None:
        """Closed by ``_on_collect``: the partial goes to the coordinator."""

    def _tick(self) -> None:
        if self._replay_now is None:
            self._progress(self.clock())

    def _progress(self, now: float) -> None:
        """Report the round's durable accepted updates: when they change (at most every
        ``progress_interval_s``) and as a heartbeat (every ten of those). Before any round
        (run 0) the heartbeat says this worker is subscribed: a fresh run waits for it."""
        interval = self.config.cluster.progress_interval_s
        done = [e for e in self.ledger.events if e[0] == "u"]  # whole updates, with norms
        accepted = len(done)
        collected = self._collected is not None
        changed = accepted != self._sent_accepted or collected != self._sent_collected
        if not (changed and now - self._sent_at >= interval) and \
                now - self._sent_at < HEARTBEATS * interval:
            return
        # Only what is new since the last report: whole lists made the reports of a round
        # quadratic in its size. The coordinator asks again (wresend) when it missed some.
        first = min(self._report_from, accepted)
        new = done[first:]
        msg = cluster_wire.WorkerProgress(
            federation=self.config.federation, worker=self.name, run=self.run,
            round=self.round, base_version=self.version,
            accepted=tuple((e[1], e[2]) for e in new), collected=collected,
            rejected=dict(self.ledger.rejected), ts=now,
            norms=tuple(float(e[5]) if len(e) > 5 else 0.0 for e in new), first=first)
        self.control.publish(self.topics.worker_progress(self.name), cluster_wire.encode(msg),
                             qos=1)
        self._sent_accepted, self._sent_collected, self._sent_at = accepted, collected, now
        self._report_from = accepted
