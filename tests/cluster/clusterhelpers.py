"""Helpers for the scale-out tests: driven devices that answer each announcement with a known
update, and the FedAvg reference summed in the coordinator's order (worker by worker)."""

from __future__ import annotations

import queue
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedmq import cluster_wire, codec
from fedmq.compression import decode_all
from fedmq.config import BrokerConfig
from fedmq.topics import Topics
from fedmq.transport import PahoTransport
from fedmq.wire import GlobalModel, ModelUpdate, RoundAnnouncement

# The integration tests' helpers (update builders, the recorder), whichever directory pytest
# collected first.
_INTEGRATION = str(Path(__file__).resolve().parent.parent / "integration")
if _INTEGRATION not in sys.path:
    sys.path.insert(0, _INTEGRATION)

from fedhelpers import update_payload  # noqa: E402

F32 = npt.NDArray[np.float32]


@dataclass
class DrivenDevice:
    """A device that answers each open announcement it sees on its broker with one update of a
    delta drawn from its own seed (so a rerun sends the same bits)."""

    broker: BrokerConfig
    federation: str
    device_id: str
    seed: int
    num_examples: int = 10
    sent: dict[int, ModelUpdate] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.topics = Topics(self.federation)
        self.transport = PahoTransport(self.broker,
                                       client_id=f"{self.device_id}-{uuid.uuid4().hex[:6]}")
        self.transport.subscribe(self.topics.round)
        self.transport.subscribe(self.topics.model)
        self.model: GlobalModel | None = None
        self.announcement: RoundAnnouncement | None = None

    def start(self) -> DrivenDevice:
        self.transport.start()
        assert self.transport.wait_connected(10), f"{self.device_id} could not connect"
        return self

    def stop(self) -> None:
        self.transport.stop()

    def delta(self, round_: int, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, F32]:
        rng = np.random.default_rng([self.seed, round_])
        return {n: (rng.standard_normal(s) * 0.1).astype(np.float32) for n, s in shapes.items()}

    def poll(self) -> None:
        """Answer the newest open announcement once (it needs the model, for the shapes)."""
        while True:
            try:
                msg = self.transport.inbox.get_nowait()
            except queue.Empty:
                break
            try:
                m = codec.decode(msg.payload)
            except Exception:
                continue
            if isinstance(m, GlobalModel):
                self.model = m
            elif isinstance(m, RoundAnnouncement):
                self.announcement = m
        ann = self.announcement
        if ann is not None and ann.open and ann.round not in self.sent \
                and self.model is not None and self.model.version == ann.base_version:
            self._send(ann)

    def _send(self, ann: RoundAnnouncement) -> None:
        assert self.model is not None
        shapes = {t.name: tuple(t.shape) for t in self.model.tensors}
        uid = f"{self.device_id}-r{ann.round}"
        payload = update_payload(self.federation, self.device_id,
                                 self.delta(ann.round, shapes), round_=ann.round,
                                 base_version=ann.base_version, num_examples=self.num_examples,
                                 update_id=uid, run=ann.run)
        self.transport.publish(self.topics.update(self.device_id), payload, qos=1)
        self.sent[ann.round] = codec.decode_as(payload, ModelUpdate)


def drive(devices: Sequence[DrivenDevice], until: float, done: object) -> None:
    """Poll every device until ``done()`` holds or the time is up."""
    while time.monotonic() < until and not done():  # type: ignore[operator]
        for d in devices:
            d.poll()
        time.sleep(0.02)


def merged_reference(base: Mapping[str, F32], partials: Sequence[cluster_wire.WorkerPartial],
                     updates: Mapping[tuple[str, str], ModelUpdate]) -> dict[str, F32]:
    """base + (Σ over workers in name order of Σ over its contributors in order of w·x) / Σ w,
    in float64 from the devices' own updates (not from the partials' sums)."""
    names = list(base)
    total = {n: np.zeros(base[n].size, dtype=np.float64) for n in names}
    weight = 0.0
    for p in sorted(partials, key=lambda p: p.worker):
        acc = {n: np.zeros(base[n].size, dtype=np.float64) for n in names}
        for pair in p.contributors:
            u = updates[pair]
            x = decode_all(u.tensors)
            for n in names:
                acc[n] += float(u.num_examples) * x[n].astype(np.float64).ravel()
            weight += float(u.num_examples)
        for n in names:
            total[n] += acc[n]
    return {n: (base[n].astype(np.float64).ravel() + total[n] / weight)
            .astype(np.float32).reshape(base[n].shape) for n in names}


def weights(model: GlobalModel) -> dict[str, F32]:
    return {k: np.array(v) for k, v in decode_all(model.tensors).items()}
