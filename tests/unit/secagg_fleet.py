"""A small secure-aggregation fleet for service-level tests: DEVICES ``DeviceSecAgg`` devices
with fixed updates, on a ``MemoryHub`` with an ``AggregatorService`` that has a state directory,
all driven by hand (no threads, a fixed clock)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from aggregator.service import AggregatorService
from device_agent.secagg import DeviceSecAgg, Out, Skipped
from fedmq import codec
from fedmq.config import (
    AggregatorConfig,
    DurabilityConfig,
    ModelConfig,
    PrivacyConfig,
    RoundsConfig,
)
from fedmq.memory_transport import MemoryHub, MemoryTransport
from fedmq.secagg import codec as sa_codec
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
from fedmq.topics import Topics
from fedmq.transport import Message
from fedmq.wire import RoundAnnouncement

FED = "sarec"
DEVICES = 6
ROUNDS = 2
LAYERS = [5, 4, 3]
PARAMS = 5 * 4 + 4 + 4 * 3 + 3
T = SecAggTopics(FED)


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def config(state_dir: Path) -> AggregatorConfig:
    return AggregatorConfig(
        federation=FED, model=ModelConfig(layers=LAYERS, seed=3),
        rounds=RoundsConfig(min_updates=DEVICES, max_updates=DEVICES, deadline_s=600.0,
                            max_rounds=0),
        durability=DurabilityConfig(state_dir=str(state_dir), snapshot_every_updates=1,
                                    snapshot_every_s=0),
        privacy=PrivacyConfig(secure_aggregation=True))


def aggregator(state: Path, hub: MemoryHub) -> AggregatorService:
    agg = AggregatorService(config(state), MemoryTransport(hub), clock=Clock())
    agg.start()
    agg.stop()  # driven by hand below
    return agg


class Fleet:
    """DEVICES secure-aggregation devices on one transport, with fixed updates per round."""

    def __init__(self, hub: MemoryHub) -> None:
        self.tr = MemoryTransport(hub)
        self.tr.start()
        for topic in (Topics(FED).round, T.roster, T.unmask, f"{T.base}/deliver/+"):
            self.tr.subscribe(topic)
        self.ids = [f"d{i}" for i in range(DEVICES)]
        self.dev = {d: DeviceSecAgg(FED, d, max_chunk_bytes=64,
                                    random=np.random.default_rng(i).bytes)
                    for i, d in enumerate(self.ids)}
        rng = np.random.default_rng(7)
        self.updates = {(r, d): ((rng.normal(0, 0.05, PARAMS)), float(rng.integers(5, 50)))
                        for r in range(1, ROUNDS + 1) for d in self.ids}

    def pump(self) -> None:
        while not self.tr.inbox.empty():
            msg = self.tr.inbox.get()
            if msg.topic == Topics(FED).round:
                ann = codec.decode(msg.payload)
                assert isinstance(ann, RoundAnnouncement)
                if ann.open and ann.round <= ROUNDS:
                    for d in self.ids:
                        self.send(self.dev[d].start(ann.run, ann.round))
                        self.send(self.dev[d].set_update(*self.updates[(ann.round, d)]))
                continue
            m = sa_codec.decode(msg.payload)
            for d in self.ids:
                if isinstance(m, SecAggRoster):
                    self.send(self.dev[d].on_roster(m))
                elif isinstance(m, SecAggDelivery) and m.device == d:
                    self.send(self.dev[d].on_delivery(m))
                elif isinstance(m, SecAggUnmask) and d in m.survivors:
                    self.send(self.dev[d].on_unmask(m))

    def send(self, outs: Sequence[Out | Skipped]) -> None:
        for m in outs:
            if isinstance(m, Skipped):
                continue  # a repeated retained message of a round already answered
            topic = {SecAggKeys: T.keys, SecAggShares: T.shares, SecAggMasked: T.masked,
                     SecAggReveal: T.reveal}[type(m)](m.device)
            self.tr.publish(topic, sa_codec.encode(m))


def drive(agg: AggregatorService, fleet: Fleet, stop_after: int | None = None,
          after: Callable[[Message], None] | None = None) -> int:
    """Run until ROUNDS models are out (or ``stop_after`` messages were handled); ``after`` is
    called with each message once the aggregator has handled it."""
    handled = 0
    for _ in range(10_000):
        if agg.version >= ROUNDS:
            return handled
        fleet.pump()
        inbox = agg.transport.inbox
        if inbox.empty():
            agg.step()  # a tick: sends what a recovery held back
            if inbox.empty() and fleet.tr.inbox.empty():
                raise AssertionError(f"stuck in round {agg.round} (version {agg.version})")
        while not inbox.empty():
            msg = inbox.get()
            agg.step(msg)
            handled += 1
            if after is not None:
                after(msg)
            if handled == stop_after:
                return handled
    raise AssertionError("no end")
