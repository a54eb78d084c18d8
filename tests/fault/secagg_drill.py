"""The kill -9 drill with secure aggregation on (``scripts/faults kill9_aggregator
--secure-aggregation``): the driver plays every device's side of the protocol
(``device_agent.secagg.DeviceSecAgg``: keys, sealed shares, masked fixed-point updates, reveals)
over the broker while the aggregator process is SIGKILLed and restarted; the restarted one
rebuilds the secure round from its write-ahead log and finishes it with the devices' answers.

The reference is the fault-free model written out from docs/security.md's fixed-point rule: each
device's delta times ``w' = (d + 1) / weight_cap``, clipped to ``±clip``, times ``2^f``, rounded
to integers, summed exactly; the sum over the sum of the rounded weights is the round's mean,
which FedAvg adds to the model. A device's update counts as folded when its
``secagg-{run}-{round}-{device}`` id is in the round's summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from aggregator.secagg import SecAggRules
from device_agent.secagg import DeviceSecAgg, Out, Skipped
from fedmq import codec
from fedmq.config import LimitsConfig, StrategyConfig
from fedmq.models import init_mlp
from fedmq.secagg import codec as sa_codec
from fedmq.secagg.fixedpoint import FixedPoint, ring_sum
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
from fedmq.transport import PahoTransport
from fedmq.wire import RoundAnnouncement

from faultkit import F32, SEED, Drill, server_opt_reference

__all__ = ["SecAggDrill"]


@dataclass
class SecAggDrill(Drill):
    """``Drill`` with ``[privacy] secure_aggregation = true``; devices speak the protocol."""

    _devs: dict[int, DeviceSecAgg] = field(default_factory=dict)
    _subscribed: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        with self.config.open("a") as f:
            f.write("[privacy]\nsecure_aggregation = true\n")
        self.sa_topics = SecAggTopics(self.federation)
        self._devs = {d: DeviceSecAgg(self.federation, f"d{d}") for d in range(self.devices)}

    def fixed(self) -> FixedPoint:
        rules = SecAggRules(min_devices=2, max_devices=self.devices, phase_s=1.0)
        return FixedPoint.for_devices(self.devices, rules.clip,
                                      float(LimitsConfig().max_examples))

    def flat(self, round_: int, device: int) -> npt.NDArray[np.float32]:
        return np.concatenate([a.ravel() for a in self.delta(round_, device).values()])

    def reference(self) -> dict[str, F32]:
        model = init_mlp(self.layers, SEED)
        names = list(model)
        sizes = [model[k].size for k in names]
        optimizer = server_opt_reference.ServerOptimizer(
            self.strategy, **StrategyConfig(name=self.strategy).settings())  # type: ignore[arg-type]
        fixed = self.fixed()
        for r in range(1, self.rounds + 1):
            ring = ring_sum([fixed.encode(self.flat(r, d), d + 1) for d in range(self.devices)])
            sums, weight = fixed.decode_sum(ring)
            parts = np.split(sums / weight, np.cumsum(sizes)[:-1])
            mean = {k: p.reshape(model[k].shape) for k, p in zip(names, parts, strict=True)}
            model = {k: v.astype(np.float32) for k, v in optimizer.step(model, mean).items()}
        return model

    def _answer_announcements(self, driver: PahoTransport) -> None:
        if not self._subscribed:
            for topic in (self.sa_topics.roster, self.sa_topics.unmask,
                          f"{self.sa_topics.base}/deliver/+"):
                driver.subscribe(topic)
            self._subscribed = True
        while not driver.inbox.empty():
            msg = driver.inbox.get_nowait()
            if not msg.payload:
                continue
            if msg.topic == self.topics.round:
                ann = codec.decode(msg.payload)
                if isinstance(ann, RoundAnnouncement):
                    self._announcement = ann
                    if ann.open and ann.round <= self.rounds:
                        for d, dev in self._devs.items():
                            self._send(driver, dev.start(ann.run, ann.round))
                            self._send(driver, dev.set_update(self.flat(ann.round, d), d + 1))
                continue
            m = sa_codec.decode(msg.payload)
            for dev in self._devs.values():
                if isinstance(m, SecAggRoster):
                    self._send(driver, dev.on_roster(m))
                elif isinstance(m, SecAggDelivery) and m.device == dev.device_id:
                    self._send(driver, dev.on_delivery(m))
                elif isinstance(m, SecAggUnmask) and dev.device_id in m.survivors:
                    self._send(driver, dev.on_unmask(m))

    def _send(self, driver: PahoTransport, outs: Sequence[Out | Skipped]) -> None:
        t = self.sa_topics
        for m in outs:
            if isinstance(m, Skipped):
                continue  # a retained message of a step already answered
            topic = {SecAggKeys: t.keys, SecAggShares: t.shares, SecAggMasked: t.masked,
                     SecAggReveal: t.reveal}[type(m)](m.device)
            driver.publish(topic, sa_codec.encode(m), qos=1)
            if isinstance(m, SecAggMasked) and m.offset == 0:
                self.sent[f"secagg-{m.run}-{m.round}-{m.device}"] = m.round
