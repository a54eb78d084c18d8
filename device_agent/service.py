"""The device agent service: transport + state machine + trainer, on one worker thread.

The paho network thread only enqueues; the worker decodes, asks the ``AgentMachine`` what to do,
trains, and publishes the update (a float32 delta from the base model). Status is retained, and
the broker flips it to ``offline`` through the last will if the device vanishes.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable

import numpy as np

from device_agent.agent import AgentMachine, Ignored, Train
from device_agent.trainers import MLPTrainer, SoftmaxTrainer, TrainConfig, Trainer
from fedmq import __version__, codec
from fedmq.compression import encode_all
from fedmq.config import AgentConfig, BrokerConfig
from fedmq.errors import ConfigError, DecodeError
from fedmq.topics import Topics
from fedmq.transport import Message, PahoTransport, Transport, Will
from fedmq.wire import CODECS, DeviceStatus, GlobalModel, ModelUpdate, RoundAnnouncement

log = logging.getLogger(__name__)


class AgentService:
    """One device: follows rounds, trains with ``trainer``, publishes updates."""

    def __init__(
        self,
        federation: str,
        device_id: str,
        trainer: Trainer,
        transport: Transport,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.topics = Topics(federation)
        self.federation = federation
        self.device_id = device_id
        self.trainer = trainer
        self.transport = transport
        self.clock = clock
        self.machine = AgentMachine(federation, device_id)
        self.ignored: Counter[str] = Counter()
        self.updates_sent = 0
        self.bytes_sent = 0
        self._stopping = threading.Event()
        self._worker: threading.Thread | None = None

    @classmethod
    def over_mqtt(cls, federation: str, device_id: str, trainer: Trainer,
                  broker: BrokerConfig) -> AgentService:
        """A service on a real broker, with a last will that marks the device offline."""
        service: AgentService
        will = Will(Topics(federation).status(device_id),
                    codec.encode(_status(federation, device_id, "offline", 0.0)))
        transport = PahoTransport(broker, client_id=f"fedmq-device-{device_id}", will=will,
                                  on_connect=lambda: service.publish_status("online"))
        service = cls(federation, device_id, trainer, transport)
        return service

    @classmethod
    def from_config(cls, config: AgentConfig, trainer: Trainer | None = None) -> AgentService:
        """Build a service from an agent config (its data and trainer included)."""
        return cls.over_mqtt(config.federation, config.device_id(),
                             trainer or build_trainer(config), config.broker)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Subscribe to the round and model topics and start the worker."""
        self.transport.subscribe(self.topics.model, qos=1)
        self.transport.subscribe(self.topics.round, qos=1)
        self.transport.start()
        self._worker = threading.Thread(target=self._work, name=f"agent-{self.device_id}",
                                        daemon=True)
        self._worker.start()

    def stop(self) -> None:
        """Say offline, stop the worker and disconnect."""
        self._stopping.set()
        if self._worker is not None:
            self._worker.join(timeout=30)
            self._worker = None
        self.publish_status("offline")
        self.transport.stop()

    def publish_status(self, state: str) -> None:
        """Publish this device's retained status (non-blocking: safe from callbacks)."""
        status = _status(self.federation, self.device_id, state, self.clock())
        self.transport.publish(self.topics.status(self.device_id), codec.encode(status), qos=1,
                               retain=True)

    # ---------------------------------------------------------------- worker

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                msg = self.transport.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                self.handle_message(msg)
            except Exception:  # a bad model or a trainer bug must not kill the device
                log.exception("device %s: error while handling %s", self.device_id, msg.topic)

    def handle_message(self, msg: Message) -> None:
        """Process one message from the round or model topic."""
        if not msg.payload:
            return  # a cleared retained message
        try:
            decoded = codec.decode(msg.payload)
        except DecodeError as exc:
            self.ignored["malformed"] += 1
            log.warning("device %s: ignoring a bad message on %s: %s", self.device_id,
                        msg.topic, exc)
            return
        if msg.topic == self.topics.model and isinstance(decoded, GlobalModel):
            actions = self.machine.on_model(decoded)
        elif msg.topic == self.topics.round and isinstance(decoded, RoundAnnouncement):
            actions = self.machine.on_round(decoded)
        else:
            self.ignored["unexpected"] += 1
            return
        self._run(actions)

    def _run(self, actions: list[Train | Ignored]) -> None:
        while actions:
            action = actions.pop(0)
            if isinstance(action, Ignored):
                self.ignored[action.reason] += 1
                continue
            self._train(action)
            actions.extend(self.machine.on_trained(action.announcement.round))

    def _train(self, job: Train) -> None:
        ann = job.announcement
        self.publish_status("training")
        config = TrainConfig.from_mapping(ann.train)
        result = self.trainer.fit(job.weights, config, round_seed=ann.round)
        # Evaluate the received global model on local data: federated evaluation for free.
        before = self.trainer.evaluate(job.weights)
        delta = {name: np.subtract(result.weights[name], base, dtype=np.float32)
                 for name, base in job.weights.items()}
        codec_name = ann.codec if ann.codec in CODECS else "fp32"
        update = ModelUpdate(
            federation=self.federation, device_id=self.device_id, round=ann.round,
            base_version=job.version, update_id=uuid.uuid4().hex,
            num_examples=result.num_examples, tensors=encode_all(delta, codec_name),
            metrics={"loss": before.loss, "accuracy": before.accuracy,
                     **{f"train_{k}": v for k, v in result.metrics.items()}})
        payload = codec.encode(update)
        self.transport.publish(self.topics.update(self.device_id), payload, qos=1)
        self.updates_sent += 1
        self.bytes_sent += len(payload)
        self.publish_status("online")
        log.info("device %s: sent update for round %d (%d bytes)", self.device_id, ann.round,
                 len(payload))


def _status(federation: str, device_id: str, state: str, ts: float) -> DeviceStatus:
    return DeviceStatus(federation=federation, device_id=device_id, state=state,
                        agent_version=__version__, capabilities=CODECS, ts=ts)


def build_trainer(config: AgentConfig) -> Trainer:
    """The trainer an agent config names, on the local data it names."""
    kind = config.trainer.kind
    if ":" in kind:  # "package.module:factory" — a user trainer, called with the config
        module_name, _, attr = kind.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"trainer.kind {kind!r}: cannot load it ({exc})") from None
        trainer: Trainer = factory(config)
        return trainer
    x, y = load_local_data(config)
    # A shard may hold only a few labels: the class count comes from the whole data set.
    num_classes = 10 if config.data.source == "digits" else int(y.max()) + 1
    if kind == "mlp":
        return MLPTrainer(x, y, num_classes=num_classes)
    if kind == "softmax":
        return SoftmaxTrainer(x, y, num_classes=num_classes)
    raise ConfigError(f"trainer.kind {kind!r} is not known: use 'mlp', 'softmax' or "
                      "'package.module:factory'")


def load_local_data(config: AgentConfig) -> tuple[np.ndarray, np.ndarray]:
    """The device's own examples, as (x float32, y int64)."""
    d = config.data
    if d.source == "npz":
        if not d.path:
            raise ConfigError("data.source = 'npz' needs data.path")
        with np.load(d.path, allow_pickle=False) as f:
            return np.asarray(f["x"], dtype=np.float32), np.asarray(f["y"], dtype=np.int64)
    from fedmq.datasets import load_digits_split, partition

    x_train, y_train, _, _ = load_digits_split(d.seed)
    shard = config.shard()
    if not 0 <= shard < d.num_shards:
        raise ConfigError(f"data.shard {shard} is outside 0..{d.num_shards - 1}")
    idx = partition(y_train, d.num_shards, d.partition, d.seed)[shard]
    return x_train[idx], y_train[idx]
