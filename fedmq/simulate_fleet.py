"""The simulated devices of ``fedmq simulate``: each one a small state machine over one MQTT
session, following the retained round announcement and model as a real agent does, and sending
a small precomputed update that the real aggregator accepts.

What a simulated device does, per announcement: nothing unless the announcement is an open
training round (not secure aggregation, not statistics) on the model version it holds and the
sampling rule (``fedmq.sampling``) selects it; then, with probability ``dropout``, it drops out of
the round (counted); otherwise it waits a delay drawn from the configured distribution and
publishes its update (QoS 1) for that round and base version, with the announcement's run, a
fresh ``update_id`` and ``num_examples`` as the weight. Async rounds: once per model version held
within ``max_staleness``. The update's tensors are one of a few random deltas encoded once per
model shape and codec (``Fleet.tensors``), so a device costs no training and no numpy per round;
chunked (``max_chunk_bytes`` or the broker's Maximum Packet Size) like a real agent's.

A chunked model (a manifest on ``model`` and parts on ``model/part/{i}``) is received whole by
every device, as by a real agent; a device holds its version once the manifest and all its parts
are in (their shapes are read once for the fleet, their data not joined). Not simulated:
signature checks (a signed model is taken as is), secure aggregation and statistics rounds
(ignored, counted).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedmq import codec
from fedmq.chunking import split_update
from fedmq.errors import DecodeError
from fedmq.mqtt_async import AsyncMqttClient, MqttError
from fedmq.sampling import selected
from fedmq.simulate_encoding import Shapes, encode_variants, encoder, model_shapes
from fedmq.topics import Topics
from fedmq.wire import (
    CODECS,
    DeviceStatus,
    GlobalModel,
    ModelUpdate,
    RoundAnnouncement,
    Tensor,
    newer,
)

__all__ = ["Delay", "Fleet", "FleetStats", "SimDevice", "status_payload"]

#: Distinct random deltas per model; device i sends variant i % VARIANTS.
VARIANTS = 8
#: Rounds whose acknowledgment times are kept.
ACK_ROUNDS = 4


@dataclass(frozen=True, slots=True)
class Delay:
    """A delay distribution in milliseconds: ``"200"`` (fixed), ``"uniform:50:500"``,
    ``"exp:300"`` (mean), ``"normal:300:100"`` (mean, standard deviation; clipped at 0)."""

    kind: str
    a: float = 0.0
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Delay:
        parts = text.split(":")
        try:
            numbers = [float(x) for x in parts[1:]] if len(parts) > 1 else [float(parts[0])]
        except ValueError:
            raise ValueError(f"bad delay {text!r}: numbers expected") from None
        kind = parts[0] if len(parts) > 1 else "fixed"
        need = {"fixed": 1, "uniform": 2, "exp": 1, "normal": 2}.get(kind)
        if need is None or len(numbers) != need or any(x < 0 for x in numbers):
            raise ValueError(f"bad delay {text!r}: use MS, uniform:MIN:MAX, exp:MEAN or "
                             "normal:MEAN:SD (milliseconds, >= 0)")
        return cls(kind, *numbers)

    def draw_s(self, rng: random.Random) -> float:
        if self.kind == "fixed":
            ms = self.a
        elif self.kind == "uniform":
            ms = rng.uniform(min(self.a, self.b), max(self.a, self.b))
        elif self.kind == "exp":
            ms = rng.expovariate(1.0 / self.a) if self.a > 0 else 0.0
        else:
            ms = max(0.0, rng.gauss(self.a, self.b))
        return ms / 1000.0


@dataclass(slots=True)
class FleetStats:
    """Counters shared by every simulated device (the progress line and the JSON summary)."""

    connected: int = 0
    connected_max: int = 0
    connects: int = 0
    disconnects: int = 0
    updates_sent: int = 0
    updates_acked: int = 0
    dropped: int = 0
    not_selected: int = 0
    rounds_seen: set[tuple[int, int]] = field(default_factory=set)
    #: (run, round) of the rounds this fleet sent updates to, and those whose model it saw.
    rounds_sent: set[tuple[int, int]] = field(default_factory=set)
    rounds_done: set[tuple[int, int]] = field(default_factory=set)
    #: Per (run, round): when the broker acknowledged the fleet's last update for it, and when
    #: the model it produced first reached a device (time.monotonic()).
    last_ack_at: dict[tuple[int, int], float] = field(default_factory=dict)
    #: Per (run, round), when the broker acknowledged each update, by update_id (to find the
    #: round's last accepted one in its summary); the latest ACK_ROUNDS rounds only.
    ack_at: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)

    def record_ack(self, key: tuple[int, int], update_id: str, now: float) -> None:
        self.last_ack_at[key] = now
        per_round = self.ack_at.get(key)
        if per_round is None:
            per_round = self.ack_at[key] = {}
            for old in sorted(self.ack_at)[:-ACK_ROUNDS]:
                del self.ack_at[old]
        per_round[update_id] = now
    model_at: dict[tuple[int, int], float] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)


class Fleet:
    """What the devices share: decoded messages (one decode per distinct payload), the encoded
    update tensors per model, the counters, the settings."""

    def __init__(self, federation: str, *, delay: Delay, dropout: float, status: bool,
                 seed: int, on_round_done: Callable[[], None] | None = None) -> None:
        self.topics = Topics(federation)
        self.federation = federation
        self.delay = delay
        self.dropout = dropout
        self.status = status
        self.rng = random.Random(seed)
        self.seed = seed
        self.stats = FleetStats()
        #: Set once the simulation ends: sessions closing now are not errors.
        self.stopping = False
        self.on_round_done = on_round_done
        self._decoded: OrderedDict[bytes, object] = OrderedDict()
        #: Chunked models: per (run, version, sha256), each part's tensor names and shapes.
        self._parts: dict[tuple[int, int, str], dict[int, Shapes]] = {}
        self._tensors: dict[tuple[str, str, str], list[tuple[tuple[Tensor, ...], dict[
            str, np.ndarray]]]] = {}

    def decode(self, payload: bytes) -> object:
        """The message in ``payload``, decoded once for the whole fleet (every device gets the
        same retained bytes); a DecodeError is cached as such."""
        hit = self._decoded.get(payload)
        if hit is None:
            try:
                hit = codec.decode(payload)
            except DecodeError as exc:
                hit = exc
            self._decoded[payload] = hit
            if len(self._decoded) > 64:
                self._decoded.popitem(last=False)
        return hit

    def add_part(self, part: GlobalModel) -> None:
        """Note a chunked model's part (its shapes, once for the fleet)."""
        key = (part.run, part.version, part.sha256)
        parts = self._parts.get(key)
        if parts is None:
            parts = self._parts[key] = {}
            for old in list(self._parts)[:-4]:  # a few versions at a time
                del self._parts[old]
        if part.chunk is not None and part.chunk not in parts:
            parts[part.chunk] = model_shapes(part)

    def shapes(self, model: GlobalModel) -> Shapes | None:
        """A whole model's shapes; a chunked model's once all its parts were seen, else None."""
        if model.chunks <= 1:
            return model_shapes(model)
        parts = self._parts.get((model.run, model.version, model.sha256), {})
        if len(parts) < model.chunks:
            return None
        seen: dict[str, tuple[int, ...]] = {}
        for i in range(model.chunks):
            for name, shape in parts[i]:
                seen.setdefault(name, shape)
        return tuple(seen.items())

    def tensors(self, model: GlobalModel, ann: RoundAnnouncement, variant: int
                ) -> tuple[tuple[Tensor, ...], dict[str, np.ndarray]]:
        """Variant ``variant`` of the update tensors for ``model`` in the announced codec, and the
        float32 deltas they encode (for chunking)."""
        codec_name = ann.codec if ann.codec in CODECS else "fp32"
        key = (model.sha256, codec_name, repr(sorted(ann.codec_params.items())))
        found = self._tensors.get(key)
        if found is None:
            shapes = self.shapes(model)
            if shapes is None:
                raise ValueError("the model's parts are not all in")
            found = encode_variants(shapes, codec_name, ann.codec_params, VARIANTS, self.seed)
            self._tensors = {key: found}  # one model at a time: older ones are not needed
        return found[variant % len(found)]

    def round_done(self, key: tuple[int, int]) -> None:
        """A device got the model that round ``key`` produced."""
        if key in self.stats.rounds_sent and key not in self.stats.rounds_done:
            self.stats.model_at[key] = time.monotonic()
            self.stats.rounds_done.add(key)
            if self.on_round_done is not None:
                self.on_round_done()


class SimDevice:
    """One simulated device: its session's messages in, its updates out."""

    def __init__(self, fleet: Fleet, index: int, device_id: str) -> None:
        self.fleet = fleet
        self.index = index
        self.device_id = device_id
        self.num_examples = 10 + index % 91
        self.client: AsyncMqttClient | None = None
        self.run = 0
        self.model: GlobalModel | None = None
        #: A chunked model's manifest whose parts are not all in yet.
        self.pending: GlobalModel | None = None
        self.announcement: RoundAnnouncement | None = None
        self.last_round = 0
        self.trained_version = (0, -1)
        #: Encoded messages of the update not yet acknowledged (resent after a reconnect).
        self.outbox: list[bytes] = []
        self.outbox_round = (0, 0)
        self.outbox_id = ""
        self.sending = False
        self.timer: asyncio.TimerHandle | None = None

    # --- messages in -----------------------------------------------------------------------
    def on_message(self, client: AsyncMqttClient, topic: str, payload: bytes,
                   retained: bool) -> None:
        msg = self.fleet.decode(payload)
        if isinstance(msg, DecodeError):
            self.fleet.stats.errors["malformed"] += 1
        elif isinstance(msg, GlobalModel):
            self.on_model(msg)
        elif isinstance(msg, RoundAnnouncement):
            self.on_round(msg)

    def on_model(self, model: GlobalModel) -> None:
        if model.federation != self.fleet.federation:
            return
        if model.chunk is not None:  # a part of a chunked model
            self.fleet.add_part(model)
            pending = self.pending
            if pending is not None and self.fleet.shapes(pending) is not None:
                self.pending = None
                self.on_model(pending)
            return
        if model.chunks > 1 and self.fleet.shapes(model) is None:
            self.pending = model  # held once its parts are in
            return
        held = self.model
        if held is not None and not newer(model.run, model.version, held.run, held.version):
            return
        self._enter_run(model.run)
        self.model = model
        self.fleet.round_done((model.run, model.round))
        self._maybe_send()

    def on_round(self, ann: RoundAnnouncement) -> None:
        if ann.federation != self.fleet.federation:
            return
        held = self.announcement
        if ann.run < self.run or (held is not None and ann.run == self.run
                                  and ann.round < held.round):
            return
        self._enter_run(ann.run)
        self.announcement = ann
        self.fleet.stats.rounds_seen.add((ann.run, ann.round))
        self._maybe_send()

    def _enter_run(self, run: int) -> None:
        if run > self.run:
            self.run, self.model, self.announcement = run, None, None
            self.last_round, self.trained_version = 0, (0, -1)

    def _maybe_send(self) -> None:
        ann, model, stats = self.announcement, self.model, self.fleet.stats
        if ann is None or model is None or not ann.open or self.timer is not None:
            return
        if ann.task != "train" or "secure_aggregation" in ann.train:
            if ann.round > self.last_round:
                self.last_round = ann.round
                stats.errors[f"unsupported_{ann.task}" if ann.task != "train"
                             else "unsupported_secure_aggregation"] += 1
            return
        if ann.mode == "async":
            if not newer(model.run, model.version, *self.trained_version) or (
                    ann.base_version - model.version > ann.max_staleness):
                return
        elif ann.round <= self.last_round or ann.base_version != model.version:
            return
        if not selected(ann.sample_seed, ann.round, self.device_id, ann.sample_rate,
                        ann.sample_draw):
            return
        self.last_round = max(self.last_round, ann.round)
        self.trained_version = (model.run, model.version)
        if self.fleet.rng.random() < self.fleet.dropout:
            stats.dropped += 1
            return
        self._publish_status("training")
        delay = self.fleet.delay.draw_s(self.fleet.rng)
        self.timer = asyncio.get_running_loop().call_later(delay, self._send, ann, model)

    # --- updates out -----------------------------------------------------------------------
    def _send(self, ann: RoundAnnouncement, model: GlobalModel) -> None:
        self.timer = None
        if self.outbox:
            self.fleet.stats.errors["update_superseded"] += 1  # the previous one never acked
        tensors, deltas = self.fleet.tensors(model, ann, self.index)
        update = ModelUpdate(
            federation=self.fleet.federation, device_id=self.device_id, round=ann.round,
            base_version=model.version, update_id=uuid.uuid4().hex,
            num_examples=self.num_examples, tensors=tensors, run=ann.run)
        limits = [x for x in (ann.max_chunk_bytes,
                              self.client.max_packet_size if self.client else 0) if x]
        messages = (split_update(update, deltas, encoder(ann), min(limits)) if limits
                    else [update])
        self.outbox = [codec.encode(m) for m in messages]
        self.outbox_round = (ann.run, ann.round)
        self.outbox_id = update.update_id
        self.fleet.stats.updates_sent += 1
        self.fleet.stats.rounds_sent.add((ann.run, ann.round))
        self._flush()
        self._publish_status("online")
        self._maybe_send()  # async rounds: a newer model may already be here

    def _flush(self) -> None:
        """Publish the outbox; it is cleared once every message of it is acknowledged."""
        client = self.client
        if not self.outbox or client is None or not client.connected or self.sending:
            return
        self.sending = True
        outbox = self.outbox
        futures = [f for f in (client.publish(self.fleet.topics.update(self.device_id), m, qos=1)
                               for m in outbox) if f is not None]
        acks = asyncio.gather(*futures, return_exceptions=True)
        acks.add_done_callback(lambda done: self._acked(outbox, done.result()))

    def _acked(self, outbox: list[bytes], results: list[float | BaseException]) -> None:
        """Every message of ``outbox`` was acknowledged, refused or lost with the session."""
        self.sending = False
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed and not self.fleet.stopping:
            refused = any(isinstance(r, MqttError) and r.code for r in failed)
            self.fleet.stats.errors["puback_refused" if refused else "unacked_lost"] += 1
            if refused:  # refused by the broker: a resend would be refused again
                self.outbox = []
        if failed:
            return  # lost: resent after the reconnect
        if self.outbox is outbox:
            self.outbox = []
            self.fleet.stats.updates_acked += 1
            # When the last PUBACK was read, not now: this callback runs after everything else
            # that read woke up (the new model reaching other devices, say).
            acked_at = max(r for r in results if not isinstance(r, BaseException))
            self.fleet.stats.record_ack(self.outbox_round, self.outbox_id, acked_at)

    def _publish_status(self, state: str) -> None:
        client = self.client
        if self.fleet.status and client is not None and client.connected:
            client.publish(self.fleet.topics.status(self.device_id),
                           status_payload(self.fleet.federation, self.device_id, state),
                           qos=1, retain=True)

    def on_connected(self) -> None:
        self._publish_status("online")
        self._flush()


def status_payload(federation: str, device_id: str, state: str) -> bytes:
    """A status message as a real agent's (``agent_version`` says it is simulated)."""
    return codec.encode(DeviceStatus(federation=federation, device_id=device_id, state=state,
                                     agent_version="fedmq-simulate", capabilities=CODECS,
                                     ts=time.time()))


