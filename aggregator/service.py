"""The aggregator service: wires the transport, the round machine and the strategy together.

Threads: the transport's network thread only enqueues; one worker thread (``_work``) decodes,
checks, folds and publishes, so a slow fold never stalls MQTT keep-alives. Every bad update is
routed to a counted rejection reason; nothing a device sends can stop the worker.

The parts it wires: ``admission`` (decode, check, weight, norm), ``robust`` (the norm bound),
``rounds`` (when a round closes), ``strategies`` + ``kernels`` (the fold), ``chunks`` +
``chunk_intake`` (chunked updates in flight), ``closing`` (a round's end), ``ledger`` (a round's
counts), ``publishing`` (what goes out), ``telemetry`` + ``evaluation`` (federated evaluation and
round progress for dashboards), ``checkpoint`` + ``wal`` (crash safety), ``reporting``
(rate-limited operator lines), ``presence`` + ``exporter`` (Prometheus metrics), ``startup``
(run id, version-0 model, inbox size).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt

from aggregator import checkpoint, chunk_intake, closing, kernels
from aggregator.admission import admit
from aggregator.async_rounds import AsyncRoundMachine, machine_for
from aggregator.chunks import PendingChunks
from aggregator.exporter import Exporter
from aggregator.folding import BoundedFold
from aggregator.history import ModelHistory
from aggregator.ledger import RoundLedger, Stats
from aggregator.presence import Presence
from aggregator.privacy import DifferentialPrivacy, norm_config, stop_before
from aggregator.publishing import Publisher
from aggregator.reporting import Reporter
from aggregator.robust import NormBound, bootstrap_size
from aggregator.rounds import (
    AbandonRound,
    Accept,
    Action,
    CloseRound,
    ExtendDeadline,
    OpenRound,
    Reject,
    RoundMachine,
    Tick,
    UpdateOffered,
)
from aggregator.secagg_service import SecAggCoordinator
from aggregator.secagg_service import attach as attach_secagg
from aggregator.spec import ModelSpec
from aggregator.startup import FOLD_BATCH, inbox_bytes, initial_weights, new_run_id
from aggregator.statistics import StatisticsTask, attach
from aggregator.strategies import Strategy, build_strategy
from aggregator.telemetry import Telemetry
from aggregator.wal import REJECT, TICK, UPDATE, WriteAheadLog
from fedmq import codec
from fedmq.config import AggregatorConfig
from fedmq.errors import ConfigError
from fedmq.instance import AggregatorInstance, refuse_second_aggregator
from fedmq.topics import Topics
from fedmq.transport import Message, PahoTransport, Transport
from fedmq.wire import ModelUpdate, RoundSummary

log = logging.getLogger(__name__)

Weights = dict[str, npt.NDArray[np.float32]]

#: Every reason an update can be rejected for (docs/protocol.md explains each).
REJECT_REASONS: tuple[str, ...] = (
    "malformed", "oversize", "wrong_federation", "wrong_device", "invalid_weight",
    "wrong_shape", "non_finite", "norm_bound", "stale", "unknown_round", "duplicate",
    "round_closed", "overload", "invalid_statistics",
)

#: Why a round's result can be dropped instead of published (docs/robustness.md).
ABANDON_REASONS: tuple[str, ...] = ("non_finite_model", "change_too_large", "below_quorum",
                                    "overlapping_partials")

#: After the last round, how long to wait for the devices' evaluations of the final model.
FINAL_EVAL_WAIT_S = 5.0


class AggregatorService:
    """Runs rounds until ``rounds.max_rounds`` (or forever when it is 0)."""

    def __init__(
        self,
        config: AggregatorConfig,
        transport: Transport | None = None,
        *,
        clock: Callable[[], float] = time.time,
        weights: Mapping[str, npt.NDArray[np.float32]] | None = None,
    ) -> None:
        self.config = config
        self.topics = Topics(config.federation)
        self.clock = clock
        # Set on every (re)connect; the worker then republishes the retained model and round,
        # which a broker restarted without persistence has forgotten.
        self._reconnected = threading.Event()
        base = dict(weights) if weights is not None else initial_weights(config)
        # np.asarray(order="C"), not np.ascontiguousarray: that makes a scalar (0-d) tensor 1-d.
        self.model: Weights = {k: np.asarray(v, dtype=np.float32, order="C")
                               for k, v in base.items()}
        self.spec = ModelSpec.from_weights(self.model)
        durable = config.durability.state_dir is not None
        # With a state directory: acknowledge updates only once they are in the log, and keep
        # a persistent session so the broker queues updates while the aggregator is down.
        # Its retained presence says it runs: a second aggregator refuses to start (start()).
        instance = AggregatorInstance(config.federation)
        self.transport: Transport = transport or PahoTransport(
            config.broker, client_id=f"fedmq-aggregator-{config.federation}",
            manual_ack=durable, inbox_bytes=inbox_bytes(self.spec.total),
            session_expiry_s=config.durability.session_expiry_s if durable else 0,
            on_connect=self._reconnected.set, will=instance.will, birth=instance.birth,
            farewell=True, duplicate_hint=instance.duplicate_hint)
        state = config.durability.state_dir
        self.state_dir = Path(state) if state is not None else None
        self.wal: WriteAheadLog | None = None
        self.history = (ModelHistory(self.state_dir / "models", config.durability.history_keep)
                        if self.state_dir is not None else None)
        self.publisher = Publisher(config, self.transport, self.topics, self.history)
        self._replay_now: float | None = None
        self._current: Message | None = None
        self.strategy: Strategy = build_strategy(config.strategy, self.spec)
        r = config.rounds
        self.machine: RoundMachine = machine_for(r)  # sync rounds, or async buffers (FedBuff)
        self.limits = codec.DecodeLimits(max_payload_bytes=config.limits.max_update_bytes,
                                         max_tensors=max(len(self.spec.names), 1),
                                         max_elements=max(self.spec.total, 1))
        self.stats = Stats()
        # A buffer's size is its max_updates (async mode): the bootstrap fits in one buffer.
        self.bound = NormBound(norm_config(config),
                               bootstrap_size(r.min_updates, self.machine.rules.max_updates))
        self.reporter = Reporter(config.limits.reject_log_every_s, r.idle_warn_s)
        self.telemetry = Telemetry(config.federation, self.publisher, self.stats,
                                   max_examples=config.limits.max_examples)
        #: Set when the last round (``max_rounds``) closed while devices evaluate: the worker
        #: waits up to ``FINAL_EVAL_WAIT_S`` for their reports on the final model.
        self._final_at: float | None = None
        self.version = 0
        self.round = 0
        #: This run's id (``fedmq.wire.newer``): set when a fresh run starts, restored on recovery.
        self.run = 0
        self.done = threading.Event()
        self.last_summary: RoundSummary | None = None
        self._round_opened = 0.0
        self._pending: dict[tuple[str, str], PendingChunks] = {}
        self._pending_devices: set[str] = set()
        self._pending_ids: set[str] = set()
        self._since_snapshot = 0
        self._snapshot_at = 0.0
        self.folder = BoundedFold(self.strategy, self.bound, self.stats,
                                  max_examples=config.limits.max_examples,
                                  reject_mode=config.robust.mode == "reject")
        #: A statistics federation ([task] kind) swaps in its own model, strategy and checks.
        self.task: StatisticsTask | None = attach(self)
        #: [privacy] secure_aggregation: devices' updates reach the strategy only summed.
        self.secagg: SecAggCoordinator | None = attach_secagg(self)
        #: Differential privacy ([privacy] noise_multiplier > 0; docs/privacy.md).
        self.privacy: DifferentialPrivacy | None = DifferentialPrivacy.attach(self)
        if isinstance(self.machine, AsyncRoundMachine):
            self.folder.discount = self.machine.weight  # the staleness weight (FedBuff)
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        #: Devices by their retained status (``status/+``), for metrics.
        self.presence = Presence(config.federation)
        #: The ``/metrics`` and ``/healthz`` endpoint, while ``[metrics] listen`` is served.
        self.exporter: Exporter | None = None

    @property
    def ledger(self) -> RoundLedger:
        """The open round's counts (kept by the fold, which counts its clips)."""
        return self.folder.ledger

    @ledger.setter
    def ledger(self, value: RoundLedger) -> None:
        self.folder.ledger = value

    # ---------------------------------------------------------------- lifecycle

    def start(self, connect_timeout: float = 30.0) -> None:
        """Connect, publish model version 0, open round 1 and start the worker thread."""
        refuse_second_aggregator(self.transport, self.config.federation, connect_timeout)
        kernels.warmup()  # compile now, not inside the first round
        kernels.set_fold_threads(self.config.strategy.fold_threads)
        self._subscribe()
        self.transport.start()
        if not self.transport.wait_connected(connect_timeout):
            b = self.config.broker
            self.transport.stop()
            error = getattr(self.transport, "last_error", None)  # PahoTransport's, if any
            raise ConnectionError(f"aggregator could not connect to the broker at "
                                  f"{b.host}:{b.port} within {connect_timeout:.0f} s; check "
                                  "[broker] in the config and that the broker runs"
                                  + (f" (last error: {error})" if error else ""))
        if not checkpoint.recover(self):
            self.run = new_run_id()
            log.info("starting run %d", self.run)
            self._publish_model(metrics={})
            self._open_round(self._now())
        self._reconnected.clear()  # this connection's state was just published
        self._worker = threading.Thread(target=self._work, name="aggregator-worker", daemon=True)
        self._worker.start()
        if self.config.metrics.listen:
            exporter = Exporter(self, self.config.metrics.listen, worker_alive=lambda: (
                (w := self._worker) is not None and w.is_alive()))
            try:
                exporter.start()
            except ConfigError:
                self.stop()  # a port in use: leave no worker or connection behind
                raise
            self.exporter = exporter
        log.info("aggregator for federation %r started (%d parameters, strategy %s)",
                 self.config.federation, self.spec.total, self.strategy.describe())

    def _subscribe(self) -> None:
        """What this aggregator reads (a scale-out role reads other topics)."""
        self.transport.subscribe(self.topics.updates, qos=1)
        self.transport.subscribe(self.topics.evals, qos=1)
        self.transport.subscribe(self.topics.statuses, qos=1)  # retained: every device's latest

    def round_accepted(self) -> tuple[tuple[str, str], ...]:
        """(device, update_id) of the round's accepted updates, for its summary."""
        return self.machine.accepted_ids

    def replay_record(self, kind: int, topic: str, payload: bytes) -> None:
        """Replay a log record of a kind only a scale-out role writes (none here)."""

    def stop(self) -> None:
        """Stop the worker and disconnect (retained model and round stay on the broker)."""
        self._stopping.set()
        if self._worker is not None:
            self._worker.join(timeout=10)
            self._worker = None
        self.transport.stop()
        if self.wal is not None:
            self.wal.close()
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None

    def _now(self) -> float:
        # While replaying the log, time is the time each record was first handled.
        return self._replay_now if self._replay_now is not None else self.clock()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until ``max_rounds`` rounds are done; True if they are."""
        return self.done.wait(timeout)

    # ---------------------------------------------------------------- worker

    def _work(self) -> None:
        inbox = self.transport.inbox
        while not self._stopping.is_set():
            msgs = []
            try:
                msgs.append(inbox.get(timeout=0.05))
                # Whatever else is already queued is folded in the same pass over the
                # accumulator (bounded: the queue holds these messages anyway).
                while len(msgs) < FOLD_BATCH:
                    msgs.append(inbox.get_nowait())
            except queue.Empty:
                pass
            try:
                self.step(*msgs)
            except Exception:  # a bug must not silently end the federation: log and go on
                log.exception("aggregator worker error (continuing)")

    def step(self, *msgs: Message) -> None:
        """One turn of the worker: handle ``msgs``, fold what was accepted, make it durable,
        acknowledge the messages, then tick the clock."""
        started = time.perf_counter()
        for msg in msgs:
            self._handle(msg)
        self._flush()
        if self.exporter is not None and msgs:
            # Idle turns (every 50 ms) would swamp both histograms: only turns with messages.
            self.exporter.observe_step(time.perf_counter() - started,
                                       self.transport.inbox.qsize())
        if self.wal is not None:
            self.wal.sync()
        for msg in msgs:
            self.transport.ack(msg)  # after the sync: an acked update is never lost
        if checkpoint.due(self):
            checkpoint.save(self, self._round_opened, mid=True)
        self._tick()

    def _tick(self) -> None:
        if self._reconnected.is_set() and self._worker is not None:
            self._reconnected.clear()
            self.publisher.republish()
        changed = self.secagg is not None and self.secagg.tick(self._now())
        actions = self.machine.handle(Tick(self._now()))
        if (actions or changed) and self.wal is not None:
            # A tick that changes the round is logged too, so replay reaches the same state.
            self.wal.append(TICK, self._now())
            self.wal.sync()
        if any(isinstance(a, ExtendDeadline) for a in actions):
            self.ledger.events.append(["t", self._now()])
        self._apply(actions, None)
        if self._replay_now is None:
            self._observe()
            m = self.machine
            self.reporter.tick(self.clock(), round_=self.round, accepted=m.accepted,
                               quorum=self.config.rounds.min_updates, deadline=m.deadline,
                               waiting=m.round is not None and m.deadline is not None
                               and m.accepted < self.config.rounds.min_updates)

    def handle_message(self, msg: Message) -> None:
        """Process one inbound message now (folding it if accepted), without a tick."""
        self._handle(msg)
        self._flush()

    def _flush(self, closing: bool = False, release: bool = False) -> None:
        self.folder.flush(self._pending, closing=closing, release=release)

    def holding(self) -> bool:
        """Whether anything is held back for the norm bound's bootstrap (no snapshot then)."""
        # A secure-aggregation round's state is in the log only (no snapshot holds it).
        return self.folder.holding() or (self.secagg is not None and self.secagg.active())

    def _log(self) -> None:
        """Append the message being handled to the log (it was accepted or folded)."""
        if self.wal is not None and self._current is not None:
            self.wal.append(UPDATE, self._now(), self._current.topic, self._current.payload)

    def _handle(self, msg: Message) -> None:
        if msg.topic.startswith(f"{self.topics.base}/status/"):
            # A device's retained presence: metrics only (never a rejection, never logged).
            self.presence.receive(self.topics.device_of(msg.topic), msg.payload, self.clock())
            return
        self._current = msg
        if self.secagg is not None and self.secagg.handle(msg):
            return
        if msg.topic.startswith(f"{self.topics.base}/eval/"):
            # A device's evaluation of a model version: metrics, not part of any round (and
            # not in the write-ahead log: the stored means are restored instead).
            if self._replay_now is None:
                self.telemetry.report(msg.payload, self.topics.device_of(msg.topic))
            return
        if not msg.topic.startswith(f"{self.topics.base}/update/"):
            return
        self.stats.bytes_in += len(msg.payload)
        self.ledger.bytes_in += len(msg.payload)
        if self._replay_now is None:
            self.reporter.received(self.clock())
        device = self.topics.device_of(msg.topic)
        if device is None:  # e.g. an empty or over-long last topic level
            self._reject(msg.topic.rsplit("/", 1)[-1][:64], "", "wrong_device")
            return
        if self.secagg is not None:  # only masked inputs count in this federation
            self._reject(device, "", "secagg_plain_update")
            return
        admitted, reason, detail = admit(
            msg.payload, device, federation=self.config.federation, spec=self.spec,
            limits=self.config.limits, decode_limits=self.limits, task=self.task)
        if admitted is None:
            self.stats.last_rejection = f"{device}: {reason} ({detail})"
            self._reject(device, "", reason, detail)
            return
        update, weight, sq = admitted.update, admitted.weight, admitted.sq_norm
        if (update.chunks == 1 and self.config.robust.mode == "reject"
                and self.bound.over(math.sqrt(sq))):
            self._reject(update.device_id, update.update_id, "norm_bound",
                         f"norm {math.sqrt(sq):.4g} over {self.bound.bound():.4g}")
            return
        if update.run and update.run != self.run:
            # Made for another run's announcement (an outbox resending across a rollback, say):
            # its round and base numbers may coincide with this run's, its model does not.
            self._reject(update.device_id, update.update_id, "stale")
            return
        offer = UpdateOffered(
            device_id=update.device_id, round=update.round, base_version=update.base_version,
            update_id=update.update_id, now=self._now())
        if update.chunks > 1:
            chunk_intake.handle_chunk(self, update, offer, weight=weight, sq=sq)
        elif (update.device_id in self._pending_devices
              or update.update_id in self._pending_ids):
            # The device (or this id) has a chunked update in flight: that one came first.
            self._reject(update.device_id, update.update_id, "duplicate")
        else:
            self._apply(self.machine.handle(offer), (update, weight, sq))

    def _reject(self, device: str, update_id: str, reason: str, detail: str = "") -> None:
        self._count_rejection(reason)
        if self.wal is not None:
            # Logged so the round's counts survive a crash, but lazily: a flood of bad messages
            # costs no fsync of its own; a crash loses only counts not yet written with an
            # accepted update or a tick (and a message whose count was written but whose
            # acknowledgement was not sent is counted again when the broker redelivers it).
            self.wal.append(REJECT, self._now(), reason, lazy=True)
        self.reporter.rejected(reason, device, update_id, detail)

    def _count_rejection(self, reason: str) -> None:
        self.stats.rejected[reason] += 1
        self.ledger.rejected[reason] += 1

    def _apply(self, actions: list[Action],
               offered: tuple[ModelUpdate, float, float] | None) -> None:
        for action in actions:
            match action:
                case Accept():
                    assert offered is not None
                    self.folder.accept(offered)  # folded by _flush, with its batch
                    self._log()
                    self._accepted(*offered)
                case Reject(device_id=dev, update_id=uid, reason=reason):
                    self._reject(dev, uid, reason)
                case CloseRound(closed_by=closed_by):
                    self._close_round(closed_by)
                case ExtendDeadline(deadline=deadline):
                    log.info("round %d below quorum at its deadline (%d/%d updates): extended "
                             "by %.0f s, to %s", self.round, self.machine.accepted,
                             self.config.rounds.min_updates, deadline - self._now(),
                             time.strftime("%H:%M:%S", time.localtime(deadline)))
                    self._announce(deadline)
                case AbandonRound(accepted=accepted):
                    log.warning("round %d abandoned below quorum (%d updates discarded); "
                                "re-announcing on model version %d", self.round, accepted,
                                self.version)
                    self.stats.abandoned["below_quorum"] += 1
                    self._open_round(self._now())

    def _accepted(self, update: ModelUpdate, weight: float, sq: float) -> None:
        self.stats.accepted += 1
        self._since_snapshot += 1
        if self.bound.observe(math.sqrt(sq)):
            self._flush(release=True)  # the bootstrap is complete: fold what it held
        # What the round machine saw, in order, so a mid-round snapshot can rebuild it.
        self.ledger.events.append(["u", update.device_id, update.update_id, self._now(),
                                   update.base_version])
        self.ledger.add_metrics(update.metrics, weight)

    # ---------------------------------------------------------------- rounds

    def _open_round(self, now: float, snapshot: bool = True) -> None:
        if stop_before(self, now):  # one more round would pass [privacy] target_epsilon
            return
        self.round += 1
        # An abandoned round's accepted updates are dropped with it.
        self.folder.new_round(RoundLedger())
        self.bound.new_round()
        self.strategy.init(self.model)
        self._round_opened = now
        # Chunked updates still in flight counted in part in the round just ended.
        partial = [(d, u, p.header[1]) for (d, u), p in self._pending.items()]
        self._pending = {}
        self._pending_devices = set()
        self._pending_ids = set()
        self.machine.handle(OpenRound(round=self.round, base_version=self.version, now=now))
        if self.secagg is not None:
            self.secagg.open(now)
        if isinstance(self.machine, AsyncRoundMachine):
            for device, update_id, base in partial:  # their later chunks are duplicates
                self.machine.retire(device, update_id, base)
        if snapshot and self.state_dir is not None and self.wal is not None:
            checkpoint.save(self, now)
        self._announce(now + self.config.rounds.deadline_s)

    def _announce(self, deadline: float, open_: bool = True) -> None:
        self.publisher.announce(round_=self.round, version=self.version, run=self.run,
                                deadline=deadline, open_=open_, draw=self.machine.extensions)

    def _publish_model(self, metrics: Mapping[str, float]) -> None:
        self.publisher.model(self.model, version=self.version, round_=self.round, run=self.run,
                             created=self._now(), metrics=metrics)
        self.telemetry.published(self.run, self.version)

    def _observe(self) -> None:
        """Publish what changed for dashboards (evaluations, progress); end the run once the
        final model's evaluations are in (or waited for long enough)."""
        now = self.clock()
        self.telemetry.flush(now)
        self.presence.tick(now)
        m = self.machine
        if m.round is not None and self._final_at is None:
            self.telemetry.progress(
                now, round_=self.round, base_version=self.version, accepted=m.accepted,
                min_updates=self.config.rounds.min_updates,
                max_updates=m.rules.max_updates, deadline=m.deadline,
                rejected=dict(self.ledger.rejected), run=self.run)
        if self._final_at is not None:
            entry = self.telemetry.evaluated(self.version)
            if (entry is not None and len(entry.devices) >= self.telemetry.expected) or (
                    now - self._final_at >= FINAL_EVAL_WAIT_S):
                self.telemetry.flush(now, force=True)
                self.done.set()
                self._stopping.set()

    def _close_round(self, closed_by: str) -> None:
        closing.close_round(self, closed_by)
