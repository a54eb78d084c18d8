"""Secure aggregation's wire messages (pure data; ``fedmq.secagg.codec`` turns them into bytes).

Every message names the federation, the aggregator's ``run`` and the ``round`` it belongs to, and
travels as a msgpack map with ``"v"``, ``"kind"`` and ``"fed"`` like every fedmq message
(docs/protocol.md, "Secure aggregation"):

=================  ==============  ==========================================  ==============
class              kind            topic (under ``fedmq/v1/{fed}/secagg/``)     direction
=================  ==============  ==========================================  ==============
``SecAggKeys``     ``sa_keys``     ``keys/{device}``                            device -> agg
``SecAggRoster``   ``sa_roster``   ``roster`` (retained)                        agg -> devices
``SecAggShares``   ``sa_shares``   ``shares/{device}``                          device -> agg
``SecAggDelivery`` ``sa_deliver``  ``deliver/{device}`` (retained)              agg -> device
``SecAggMasked``   ``sa_masked``   ``masked/{device}``                          device -> agg
``SecAggUnmask``   ``sa_unmask``   ``unmask`` (retained)                        agg -> devices
``SecAggReveal``   ``sa_reveal``   ``reveal/{device}``                          device -> agg
=================  ==============  ==========================================  ==============
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from fedmq.secagg.crypto import KEY_BYTES, NONCE_BYTES, TAG_BYTES
from fedmq.secagg.shamir import SHARE_BYTES
from fedmq.topics import Topics
from fedmq.wire import Blob

#: A sealed pair of shares: nonce, the two 66-byte shares, the GCM tag.
SEALED_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES
COMMIT_BYTES = 32


@dataclass(frozen=True, slots=True)
class SecAggKeys:
    """Step 1: a device's two public keys for the round."""

    federation: str
    run: int
    round: int
    device: str
    c_key: bytes
    s_key: bytes


@dataclass(frozen=True, slots=True)
class SecAggRoster:
    """The devices that advertised (U1), their keys, the graph and the fixed-point encoding."""

    federation: str
    run: int
    round: int
    #: (device, c key, s key), sorted by device
    devices: tuple[tuple[str, bytes, bytes], ...]
    degree: int
    threshold: int
    graph_seed: bytes
    frac_bits: int
    clip: float
    weight_cap: float
    #: the masked vector's length: the model's parameters plus the weight element
    size: int


@dataclass(frozen=True, slots=True)
class SecAggShares:
    """Step 2: a device's sealed shares, by recipient, and its commitment to its self-mask seed."""

    federation: str
    run: int
    round: int
    device: str
    commitment: bytes
    shares: Mapping[str, bytes]


@dataclass(frozen=True, slots=True)
class SecAggDelivery:
    """The sealed shares addressed to ``device``, by sender (the senders are U2 ∩ neighbours)."""

    federation: str
    run: int
    round: int
    device: str
    shares: Mapping[str, bytes]


@dataclass(frozen=True, slots=True)
class SecAggMasked:
    """Step 3: values ``[offset, offset + len(data) / 4)`` of a device's masked vector of
    ``size`` little-endian uint32 (one message, or one chunk of several)."""

    federation: str
    run: int
    round: int
    device: str
    offset: int
    size: int
    data: Blob


@dataclass(frozen=True, slots=True)
class SecAggUnmask:
    """Step 4's request: whose masked input is in the sum (U3) and who sent shares only."""

    federation: str
    run: int
    round: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SecAggReveal:
    """Step 4's answer: shares of survivors' self-mask seeds and of dropped devices' mask keys."""

    federation: str
    run: int
    round: int
    device: str
    b_shares: Mapping[str, bytes]
    s_shares: Mapping[str, bytes]


SecAggMessage = (SecAggKeys | SecAggRoster | SecAggShares | SecAggDelivery | SecAggMasked
                 | SecAggUnmask | SecAggReveal)

__all__ = ["COMMIT_BYTES", "KEY_BYTES", "SEALED_BYTES", "SecAggDelivery", "SecAggKeys",
           "SecAggMasked", "SecAggMessage", "SecAggReveal", "SecAggRoster", "SecAggShares",
           "SecAggTopics", "SecAggUnmask"]


@dataclass(frozen=True, slots=True)
class SecAggTopics:
    """The secure-aggregation topics of one federation."""

    federation: str

    @property
    def base(self) -> str:
        return f"{Topics(self.federation).base}/secagg"

    def keys(self, device: str) -> str:
        return f"{self.base}/keys/{device}"

    def shares(self, device: str) -> str:
        return f"{self.base}/shares/{device}"

    def deliver(self, device: str) -> str:
        return f"{self.base}/deliver/{device}"

    def masked(self, device: str) -> str:
        return f"{self.base}/masked/{device}"

    def reveal(self, device: str) -> str:
        return f"{self.base}/reveal/{device}"

    @property
    def roster(self) -> str:
        return f"{self.base}/roster"

    @property
    def unmask(self) -> str:
        return f"{self.base}/unmask"

    @property
    def from_devices(self) -> tuple[str, ...]:
        """What the aggregator subscribes to."""
        return tuple(f"{self.base}/{k}/+" for k in ("keys", "shares", "masked", "reveal"))

    def device_of(self, topic: str) -> tuple[str, str] | None:
        """(step, device) of a device-to-aggregator topic, or None."""
        head = f"{self.base}/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head):].split("/")
        if len(parts) != 2 or parts[0] not in ("keys", "shares", "masked", "reveal"):
            return None
        return parts[0], parts[1]
