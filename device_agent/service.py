"""The device agent service: transport + state machine + trainer, on one worker thread.

The paho network thread only enqueues; the worker decodes, asks the ``AgentMachine`` what to do,
trains, and publishes the update (a float32 delta from the base model). Status is retained, and
the broker flips it to ``offline`` through the last will if the device vanishes.

Updates go out through the outbox and stay there until the broker acknowledged them
(``device_agent.delivery``).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

from device_agent.agent import AgentMachine, Ignored, Train
from device_agent.factory import build_trainer
from device_agent.model_gate import SignedGate, accepted_path, gate_of, raise_floor
from device_agent.outbox import Outbox
from device_agent.pacing import (
    _WAKE,
    STATUS_REFRESH_S,
    AgentPacing,
)
from device_agent.secagg_link import SecAggLink, wanted
from device_agent.statistics import Analyst, NoTraining
from device_agent.trained_record import load_trained, save_trained
from device_agent.trainers import (
    TrainConfig,
    Trainer,
    check_trainer,
)
from device_agent.update_encoding import encode_update
from fedmq import __version__, codec, compression
from fedmq.chunking import ModelAssembler
from fedmq.config import AgentConfig, BrokerConfig, DeviceConfig
from fedmq.errors import DecodeError
from fedmq.topics import Topics
from fedmq.transport import Message, PahoTransport, Transport, Will
from fedmq.wire import (
    CODECS,
    DeviceStatus,
    Evaluation,
    GlobalModel,
    ModelUpdate,
    RoundAnnouncement,
    newer,
)

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]


class AgentService(AgentPacing):
    """One device: follows rounds, trains with ``trainer``, publishes updates."""

    def __init__(
        self,
        federation: str,
        device_id: str,
        trainer: Trainer,
        transport: Transport,
        *,
        clock: Callable[[], float] = time.time,
        feedback: compression.ErrorFeedback | None = None,
        outbox: Outbox | None = None,
        trained_path: Path | None = None,
        evaluate: bool = True,
        train: bool = True,
        min_interval_s: float = 0.0,
    ) -> None:
        self.topics = Topics(federation)
        self.federation = federation
        self.device_id = device_id
        self.trainer = trainer
        self.transport = transport
        self.clock = clock
        self.machine = AgentMachine(federation, device_id, min_interval_s=min_interval_s)
        # Which round this device last trained for, kept beside its outbox so a restart does
        # not train (and send) the same round again (see _remember_trained).
        self.trained_path = trained_path
        self.machine.trained_before = load_trained(trained_path)
        self.assembler = ModelAssembler()
        #: Verifies models and announcements when ``[security] trusted_keys`` is set; what
        #: it let through is kept in ``accepted_path`` (refusing replays after a restart).
        self.gate: SignedGate | None = None
        self.accepted_path: Path | None = None
        #: QoS of every subscription (``[device] subscribe_qos``).
        self.subscribe_qos = 1
        self.secagg = SecAggLink(federation, device_id, transport)
        #: Every ignored or refused message, by reason; also in the retained status.
        self.ignored: Counter[str] = Counter()
        self._state = "online"  # the last state published
        self._status_due = False  # a refusal not in the retained status yet
        self._status_at = -math.inf
        self.secagg.skipped = self.ignored  # its skipped steps are counted there too
        #: Report an evaluation of every new model (federated evaluation); train for rounds
        #: (False: an evaluation-only device, ``[data] eval_fraction = 1``).
        self.evaluate = evaluate
        self.train = train
        self.evaluations_sent = 0
        self.evaluation_errors = 0
        #: Rounds whose training (``fit``, or encoding its result) raised: skipped, not fatal.
        self.training_errors = 0
        self._evaluated = (-1, -1)  # (run, version) last scored
        #: A statistics device's source of values (``[task] kind = "statistics"``).
        self.analyst: Analyst | None = None
        self.updates_sent = 0
        self.bytes_sent = 0
        self.feedback = feedback or compression.ErrorFeedback(None)
        d = DeviceConfig()
        self._init_delivery(outbox if outbox is not None  # an empty Outbox is falsy
                            else Outbox(None, d.outbox_max_bytes, d.outbox_max_messages))
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None
        #: Turns of the worker loop (each one a sleep on the inbox): an idle agent's few.
        self.wakeups = 0
        # The "no round announcement yet" line (service clock times; see check_waiting).
        self._round_seen = False
        self._waiting_since: float | None = None
        self._round_wait_logged: float | None = None

    @classmethod
    def over_mqtt(cls, federation: str, device_id: str, trainer: Trainer,
                  broker: BrokerConfig, *,
                  feedback: compression.ErrorFeedback | None = None,
                  outbox: Outbox | None = None,
                  trained_path: Path | None = None,
                  evaluate: bool = True, train: bool = True,
                  min_interval_s: float = 0.0) -> AgentService:
        """A service on a real broker, with a last will that marks the device offline.

        The will is built before each connection attempt, so its ``ts`` is that connect's time
        (the broker publishes it later, when the device vanishes, as it was then).
        """
        service: AgentService

        def will() -> Will:
            return Will(Topics(federation).status(device_id),
                        codec.encode(_status(federation, device_id, "offline",
                                             service.clock())))

        transport = PahoTransport(broker, client_id=f"fedmq-device-{device_id}", will=will,
                                  duplicate_hint=f"device id {device_id!r} is in use by another "
                                  "agent: every agent needs its own (--device-id, "
                                  "FEDMQ_DEVICE_ID or [device] id)",
                                  # a lambda: `service` does not exist yet
                                  on_connect=lambda: service.on_connected(),  # noqa: PLW0108
                                  on_published=lambda: service.on_published())  # noqa: PLW0108
        service = cls(federation, device_id, trainer, transport, feedback=feedback,
                      outbox=outbox, trained_path=trained_path, evaluate=evaluate, train=train,
                      min_interval_s=min_interval_s)
        return service

    @classmethod
    def from_config(cls, config: AgentConfig, trainer: Trainer | None = None) -> AgentService:
        """Build a service from an agent config (its data and trainer included)."""
        device_id = config.device_id()
        d = config.device
        state = d.state_dir
        path = Path(state) / f"feedback-{config.federation}.npz" if state else None
        outbox = Outbox(Path(state) / "outbox" if state else None, d.outbox_max_bytes,
                        d.outbox_max_messages)
        trained = Path(state) / f"trained-{config.federation}.json" if state else None
        if config.task.kind == "statistics":  # no model: a summary of its values each round
            service = cls.over_mqtt(config.federation, device_id, NoTraining(), config.broker,
                                    outbox=outbox, trained_path=trained, evaluate=False)
            service.analyst = Analyst.from_config(config)
            service.gate, service.accepted_path = gate_of(config, device_id), accepted_path(config)
            service.subscribe_qos = d.subscribe_qos
            return service
        if trainer is None:
            trainer = build_trainer(config)  # checked there, failing as a ConfigError
        else:
            check_trainer(trainer)  # fails at start-up, not at the first round
        fraction = config.data.eval_fraction
        service = cls.over_mqtt(config.federation, device_id, trainer,
                                config.broker, feedback=compression.ErrorFeedback(path),
                                outbox=outbox, trained_path=trained, evaluate=fraction > 0,
                                train=fraction < 1, min_interval_s=d.min_interval_s)
        service.gate, service.accepted_path = gate_of(config, device_id), accepted_path(config)
        service.subscribe_qos = d.subscribe_qos
        return service

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Subscribe to the round and model topics and start the worker."""
        for topic in (self.topics.model, self.topics.model_parts, self.topics.round):
            self.transport.subscribe(topic, qos=self.subscribe_qos)
        for topic in self.secagg.subscriptions():
            self.transport.subscribe(topic, qos=self.subscribe_qos)
        self.transport.start()
        self._connected_again.set()  # publish what an earlier process left in the outbox
        self._worker = threading.Thread(target=self._work, name=f"agent-{self.device_id}",
                                        daemon=True)
        self._worker.start()

    def stop(self) -> None:
        """Say offline, stop the worker and disconnect."""
        self._stopping.set()
        self.wake()
        if self._worker is not None:
            self._worker.join(timeout=30)
            self._worker = None
        self._sweep()  # what is left stays in the outbox for the next start
        self.publish_status("offline")
        self.transport.stop()

    def publish_status(self, state: str) -> None:
        """Publish this device's retained status (non-blocking: safe from callbacks)."""
        # dict() copies the Counter in one step under the GIL: this also runs on paho's thread.
        status = _status(self.federation, self.device_id, state, self.clock(),
                         dict(self.ignored))
        self._state, self._status_due, self._status_at = state, False, time.monotonic()
        self.transport.publish(self.topics.status(self.device_id), codec.encode(status), qos=1,
                               retain=True)

    def on_connected(self) -> None:
        """The transport's connect hook (paho's network thread): only records and enqueues."""
        self.publish_status("online")
        self._waiting_since = None  # "no round announcement" counts from this connect
        self._connected_again.set()
        self.wake()  # pump_outbox publishes what is pending, check_waiting starts counting

    def on_published(self) -> None:
        """The transport's PUBACK hook (paho's network thread): wake the worker if an update
        waits for its acknowledgement (so it leaves the outbox now, without polling)."""
        if self._deliveries:
            self.wake()

    # ---------------------------------------------------------------- worker

    def _work(self) -> None:
        # No polling: the worker sleeps on the inbox until a message, a wake-up (connect,
        # PUBACK, stop) or the next of its own timers (idle_timeout).
        while not self._stopping.is_set():
            try:
                self.pump_outbox()
            except Exception:  # e.g. a disk error: the device keeps following rounds
                log.exception("device %s: outbox error", self.device_id)
            self.check_waiting()
            if self._status_due and time.monotonic() - self._status_at >= STATUS_REFRESH_S:
                self.publish_status(self._state)  # the refusals counted since the last one
            self.wakeups += 1
            try:
                msg: Message | None = self.transport.inbox.get(timeout=self.idle_timeout())
            except queue.Empty:
                msg = None
            if msg is _WAKE:
                msg = None
            try:
                if msg is not None:
                    self.handle_message(msg)
                if self.transport.inbox.empty():
                    # Async rounds train from the newest model held: only once none is queued.
                    self.tick()
            except Exception:  # a bad model or a trainer bug must not kill the device
                log.exception("device %s: error while handling %s", self.device_id,
                              msg.topic if msg is not None else "a tick")

    def tick(self) -> None:
        """Let the machine train if that is due now (asynchronous rounds; see ``on_tick``)."""
        self._run(self.machine.on_tick(self.clock()))

    def handle_message(self, msg: Message) -> None:
        """Process one message from the round or model topic."""
        if self.secagg.handle(msg):
            return
        if not msg.payload:
            return  # a cleared retained message
        try:
            decoded = codec.decode(msg.payload)
        except DecodeError as exc:
            self.ignored["malformed"] += 1
            self._status_due = True
            log.warning("device %s: ignoring a bad message on %s: %s", self.device_id,
                        msg.topic, exc)
            return
        if isinstance(decoded, GlobalModel) and msg.topic.startswith(self.topics.model):
            whole, refused = (
                (self.assembler.add(decoded), None) if self.gate is None else self.gate.model(
                    decoded, msg.payload, (self.machine.run, self.machine.model_version)))
            if refused is not None:
                self._refuse(refused, msg.topic)
                return
            if whole is None:
                return  # a part of a chunked model; the rest is on its way
            actions = self.machine.on_model(whole)
            if (self.evaluate and self.machine.model_version == whole.version
                    and self.machine.run == whole.run
                    and newer(whole.run, whole.version, *self._evaluated)):
                # Adopted, and not scored yet (a republished retained model is not new).
                self._evaluated = (whole.run, whole.version)
                self._evaluate(whole.version, whole.run)
        elif msg.topic == self.topics.round and isinstance(decoded, RoundAnnouncement):
            if self.gate is not None and (refused := self.gate.round(decoded)):
                self._refuse(refused, msg.topic)
                return
            self._round_seen = True
            actions = self.machine.on_round(decoded)
        else:
            self.ignored["unexpected"] += 1
            return
        if self.gate is not None:
            raise_floor(self.gate, self.machine, self.accepted_path)
        self._run(actions)

    def _refuse(self, reason: str, topic: str) -> None:
        """Count a model or announcement the signature check refused (the device keeps what
        it had)."""
        self.ignored[reason] += 1
        self._status_due = True
        if reason != "old_model":  # a republished version is routine
            log.warning("device %s: refused a message on %s: %s", self.device_id, topic,
                        reason)

    def _run(self, actions: list[Train | Ignored]) -> None:
        while actions:
            action = actions.pop(0)
            if isinstance(action, Ignored):
                self.ignored[action.reason] += 1
                continue
            if not self.train:  # an evaluation-only device answers no round
                self.ignored["evaluate_only"] += 1
                actions.extend(self.machine.on_trained(action.announcement.round))
                continue
            try:
                self._train(action)
            except Exception:  # a trainer bug costs this round only, never the next ones
                self.training_errors += 1
                log.exception("device %s: training for round %d failed; the round goes on "
                              "without this device", self.device_id, action.announcement.round)
                self.publish_status("online")
            actions.extend(self.machine.on_trained(action.announcement.round))

    def _train(self, job: Train) -> None:
        ann = job.announcement
        self.publish_status("training")
        if ann.task == "statistics":
            self._contribute(job)
            return
        config = TrainConfig.from_mapping(ann.train)
        if wanted(ann):
            self.secagg.start(ann)  # the keys go out while this device trains
        result = self.trainer.fit(job.weights, config, round_seed=ann.round)
        delta = {name: np.subtract(result.weights[name], base, dtype=np.float32)
                 for name, base in job.weights.items()}
        update = ModelUpdate(
            federation=self.federation, device_id=self.device_id, round=ann.round,
            base_version=job.version, update_id=uuid.uuid4().hex, run=ann.run,
            # int() and float(): numpy scalars (np.int64, np.float32) cannot be encoded.
            num_examples=int(result.num_examples), tensors=(),
            # What training measured (train_loss, train_accuracy for the built-in trainers);
            # the model's quality on held-out data goes in Evaluation reports instead.
            metrics={str(k): float(v) for k, v in result.metrics.items()})
        if wanted(ann):  # masked once the neighbours' shares are in (secagg_link)
            self.secagg.contribute_update(update, delta, ann, self.feedback)
            self._remember_trained(ann, job)
            self.updates_sent += 1
            return self.publish_status("online")
        messages = encode_update(update, delta, ann, self.feedback,
                                 self.transport.max_packet_size)
        topic = self.topics.update(self.device_id)
        payloads = [codec.encode(message) for message in messages]
        self._send_update(update.update_id, [(topic, payload) for payload in payloads])
        self._remember_trained(ann, job)
        sent = sum(len(payload) for payload in payloads)
        self.updates_sent += 1
        self.bytes_sent += sent
        self.publish_status("online")
        log.info("device %s: sent update for round %d from model version %d (%d bytes in %d "
                 "messages)", self.device_id, ann.round, job.version, sent, len(messages))

    def _contribute(self, job: Train) -> None:
        """Send this device's statistics for the announced columns (one message)."""
        if self.analyst is None:
            raise RuntimeError('the federation asks for statistics; set [task] kind = '
                               '"statistics" in agent.toml to take part')
        ann = job.announcement
        update = self.analyst.update(self.federation, self.device_id, ann, job.version)
        payload = codec.encode(update)
        self._send_update(update.update_id, [(self.topics.update(self.device_id), payload)])
        self._remember_trained(ann, job)
        self.updates_sent += 1
        self.bytes_sent += len(payload)
        self.publish_status("online")
        log.info("device %s: sent statistics for round %d (%d bytes)", self.device_id,
                 ann.round, len(payload))

    def _evaluate(self, version: int, run: int) -> None:
        """Score the model just adopted on the held-out data and report it (QoS 1, not kept
        in the outbox: a lost report costs one sample of a metric, never a model)."""
        weights = self.machine.weights
        if weights is None:
            return
        try:
            result = self.trainer.evaluate(weights)
            metrics = {"loss": float(result.loss)}
            accuracy = getattr(result, "accuracy", None)
            if accuracy is not None:
                metrics["accuracy"] = float(accuracy)
            for key, value in (getattr(result, "metrics", None) or {}).items():
                metrics[str(key)] = float(value)
            n = int(result.num_examples)
        except Exception:  # a trainer bug must not stop the device from training
            self.evaluation_errors += 1
            log.exception("device %s: evaluating model version %d failed", self.device_id,
                          version)
            return
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        if n < 1 or not metrics:
            return
        report = Evaluation(federation=self.federation, device_id=self.device_id,
                            version=version, num_examples=n, metrics=metrics, run=run,
                            ts=self.clock())
        self.transport.publish(self.topics.eval(self.device_id), codec.encode(report), qos=1)
        self.evaluations_sent += 1
        log.info("device %s: model version %d on %d held-out examples: %s", self.device_id,
                 version, n, ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())))

    def _remember_trained(self, ann: RoundAnnouncement, job: Train) -> None:
        """Record the round just sent; written after the outbox has the update, so a crash in
        between at worst trains the round again (the old behaviour), never skips it unsent.
        Async rounds record the model trained from, which is not always the announced one."""
        if self.trained_path is None:
            return
        buffered = ann.mode == "async"
        try:
            save_trained(self.trained_path, ann.round,
                         job.version if buffered else ann.base_version,
                         job.model_sha256 if buffered else ann.model_sha256, ann.deadline)
        except OSError as exc:
            log.warning("device %s: cannot record the trained round in %s: %s",
                        self.device_id, self.trained_path, exc)

def _status(federation: str, device_id: str, state: str, ts: float,
            ignored: dict[str, int] | None = None) -> DeviceStatus:
    return DeviceStatus(federation=federation, device_id=device_id, state=state,
                        agent_version=__version__, capabilities=CODECS, ts=ts,
                        ignored=ignored or {})


