"""The device agent's link to secure aggregation: ``DeviceSecAgg`` wired to a transport.

The service asks ``wanted(announcement)`` (the aggregator puts ``secure_aggregation = 1`` in the
announcement's ``train`` map), calls ``start`` before training (the keys go out while the device
trains) and ``contribute`` with the trained delta instead of publishing a ``ModelUpdate``; every
message on the device's secure-aggregation topics goes to ``handle``. What the device sends is
published at QoS 1; what it refuses to answer is counted in ``skipped`` as ``secagg_<reason>``
(the service makes that its ``ignored`` counter, which its retained status reports).

The delta is first sent through the announced codec (with its error feedback, as a plain update
would be): an ``int8`` federation masks the dequantized int8 values, so the sum is that of what
devices would have sent, quantized to the fixed-point ring.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from device_agent.secagg import DeviceSecAgg, Out, Skipped
from device_agent.update_encoding import encode_update
from fedmq import compression
from fedmq.chunking import place
from fedmq.errors import DecodeError
from fedmq.secagg import codec
from fedmq.secagg.messages import (
    SecAggDelivery,
    SecAggKeys,
    SecAggMasked,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggTopics,
    SecAggUnmask,
)
from fedmq.secagg.noise import DeviceNoise
from fedmq.transport import Message, Transport
from fedmq.wire import ModelUpdate, RoundAnnouncement

log = logging.getLogger(__name__)

#: Room left in a chunk for the message around the masked values.
_CHUNK_OVERHEAD = 512


def wanted(ann: RoundAnnouncement) -> bool:
    """Whether the announced round aggregates securely."""
    return ann.train.get("secure_aggregation") == 1


class SecAggLink:
    """One device's secure-aggregation traffic."""

    def __init__(self, federation: str, device_id: str, transport: Transport) -> None:
        self.topics = SecAggTopics(federation)
        self.device_id = device_id
        self.transport = transport
        self.machine = DeviceSecAgg(federation, device_id)
        self.skipped: Counter[str] = Counter()
        self.bytes_sent = 0

    def subscriptions(self) -> tuple[str, ...]:
        return self.topics.roster, self.topics.unmask, self.topics.deliver(self.device_id)

    def start(self, ann: RoundAnnouncement) -> None:
        """Take part in ``ann``'s round: new keys, published now."""
        limits = [x for x in (ann.max_chunk_bytes, self.transport.max_packet_size) if x]
        self.machine.max_chunk_bytes = max(4, min(limits) - _CHUNK_OVERHEAD) if limits else 0
        try:
            noise = DeviceNoise.from_train(ann.train, ann.min_updates)
        except ValueError as exc:  # no noise, no masked input: to the server, a dropout
            self.skipped["secagg_bad_noise"] += 1
            log.warning("device %s: %s", self.device_id, exc)
            self.machine.ctx, self.machine.client = None, None  # nothing of an earlier round
            return
        self._send(self.machine.start(ann.run, ann.round, noise))

    def contribute(self, delta: Mapping[str, npt.NDArray[np.float32]], weight: float) -> None:
        """The trained delta (tensors in the model's order) and the device's weight."""
        flat = (np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in delta.values()])
                if delta else np.zeros(0))
        self._send(self.machine.set_update(flat, weight))

    def contribute_update(self, update: ModelUpdate,
                          delta: Mapping[str, npt.NDArray[np.float32]], ann: RoundAnnouncement,
                          feedback: compression.ErrorFeedback) -> None:
        """``contribute`` what a plain update of ``ann``'s codec would have carried."""
        if ann.codec != "fp32":
            # the codec's values only: the masked vector is chunked on its own (SecAggMasked)
            whole = dataclasses.replace(ann, max_chunk_bytes=0)
            messages = encode_update(update, dict(delta), whole, feedback, None)
            delta = place(((t, compression.decode_range(t)) for m in messages
                           for t in m.tensors), {n: a.shape for n, a in delta.items()})
        self.contribute(delta, float(update.num_examples))

    def handle(self, msg: Message) -> bool:
        """Take ``msg`` if it is on a secure-aggregation topic (True)."""
        if not msg.topic.startswith(f"{self.topics.base}/"):
            return False
        if not msg.payload:
            return True  # a cleared retained message
        try:
            m = codec.decode(msg.payload)
        except DecodeError:
            self.skipped["secagg_malformed"] += 1
            return True
        match m:
            case SecAggRoster() if msg.topic == self.topics.roster:
                self._send(self.machine.on_roster(m))
            case SecAggDelivery() if msg.topic == self.topics.deliver(self.device_id):
                self._send(self.machine.on_delivery(m))
            case SecAggUnmask() if msg.topic == self.topics.unmask:
                self._send(self.machine.on_unmask(m))
            case _:
                self.skipped["secagg_unexpected"] += 1
        return True

    def _send(self, outs: Sequence[Out | Skipped]) -> None:
        for m in outs:
            if isinstance(m, Skipped):
                if m.reason != "wrong_round":  # a retained message of an earlier round
                    self.skipped[f"secagg_{m.reason}"] += 1
                    log.warning("device %s: secure aggregation step skipped: %s",
                                self.device_id, m.reason)
                continue
            payload = codec.encode(m)
            self.transport.publish(self._topic(m), payload, qos=1)
            self.bytes_sent += len(payload)

    def _topic(self, m: Out) -> str:
        match m:
            case SecAggKeys():
                return self.topics.keys(self.device_id)
            case SecAggShares():
                return self.topics.shares(self.device_id)
            case SecAggMasked():
                return self.topics.masked(self.device_id)
            case SecAggReveal():
                return self.topics.reveal(self.device_id)
