"""The device's outbox over a real Mosquitto: an update outlives a broker outage and a restart.

Each update message is written to the outbox before it is published and stays there until the
broker acknowledged it (device_agent/outbox.py); what is left is published again after a
reconnect or a restart, and the aggregator counts a second copy as ``duplicate``.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import MosquittoFactory

from device_agent.outbox import Outbox
from device_agent.service import AgentService
from device_agent.trainers import FitResult, MLPTrainer, TrainConfig
from fedmq import codec
from fedmq.config import AgentConfig, DeviceConfig
from fedmq.models import Weights
from fedmq.transport import Delivery, PahoTransport
from fedmq.wire import ModelUpdate

from fedhelpers import (
    LAYERS,
    aggregator_config,
    broker_config,
    running_aggregator,
    unique_federation,
    wait_until,
)

DEVICE = "dev-outbox"
BIG = 64 * 1024 * 1024


def trainer(seed: int = 0) -> MLPTrainer:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((16, LAYERS[0])).astype(np.float32)
    return MLPTrainer(x, rng.integers(0, LAYERS[-1], 16), LAYERS[-1])


class GatedTrainer(MLPTrainer):
    """Trains only once the test opens ``gate`` (``entered`` tells it training has begun)."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((16, LAYERS[0])).astype(np.float32)
        super().__init__(x, rng.integers(0, LAYERS[-1], 16), LAYERS[-1])
        self.entered = threading.Event()
        self.gate = threading.Event()

    def fit(self, weights: Weights, config: TrainConfig, round_seed: int) -> FitResult:
        self.entered.set()
        assert self.gate.wait(20), "the test never opened the gate"
        return super().fit(weights, config, round_seed)


def pending_update_ids(outbox: Outbox) -> set[str]:
    return {codec.decode_as(p, ModelUpdate).update_id for _, _, p in outbox.pending()}


@pytest.mark.broker
def test_update_trained_while_the_broker_is_down_is_delivered_when_it_is_back(
        mosquitto_factory: MosquittoFactory, tmp_path: Path) -> None:
    broker = mosquitto_factory()
    bc = broker_config(broker)
    fed = unique_federation("outbox")
    gated = GatedTrainer()
    # Held while the broker is down, so the device cannot publish before the aggregator
    # (a clean session on a broker that lost everything) has subscribed again: the outbox
    # guarantees the broker's PUBACK, not that a subscriber was there to receive it.
    reconnect = threading.Event()
    reconnect.set()
    service: AgentService

    def on_connect() -> None:  # paho's network thread: blocking it holds every send
        reconnect.wait(20)
        service.on_connected()

    transport = PahoTransport(bc, client_id=f"fedmq-device-{DEVICE}-{fed}",
                              on_connect=on_connect)
    outbox = Outbox(tmp_path / "outbox", BIG, 100)
    service = AgentService(fed, DEVICE, gated, transport, outbox=outbox)
    config = aggregator_config(bc, fed, min_updates=1, max_updates=1)
    with running_aggregator(config) as agg:
        service.start()
        try:
            assert gated.entered.wait(10), "the device never started training"
            reconnect.clear()
            broker.kill()
            wait_until(lambda: not transport.connected, what="the device saw the broker go")
            gated.gate.set()
            wait_until(lambda: service.updates_sent == 1, what="the update was made")
            (update_id,) = pending_update_ids(outbox)  # on disk, not yet acknowledged
            assert len(Outbox(tmp_path / "outbox", BIG, 100)) == 1
            time.sleep(0.3)
            assert agg.stats.accepted == 0

            broker.start()  # same port, empty (no persistence)
            assert agg.transport.wait_connected(10)
            time.sleep(0.3)  # its SUBACK
            reconnect.set()
            assert agg.wait(10), "the round never closed"
            wait_until(lambda: len(outbox) == 0, what="the outbox emptied")
        finally:
            reconnect.set()
            gated.gate.set()
            service.stop()
    assert agg.last_summary is not None
    assert agg.last_summary.accepted == ((DEVICE, update_id),)
    assert agg.stats.accepted == 1
    assert service.updates_acked == 1
    assert Outbox(tmp_path / "outbox", BIG, 100).pending() == []


class NeverDone(Delivery):
    def __init__(self) -> None:
        super().__init__(None)

    def done(self) -> bool:
        return False


class AckLostTransport(PahoTransport):
    """Publishes for real but never reports the PUBACK: as if the process died before it."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Delivery:
        super().publish(topic, payload, qos, retain)
        return NeverDone()


@pytest.mark.broker
def test_a_restarted_device_resends_its_pending_update_and_it_counts_once(
        mosquitto_factory: MosquittoFactory, tmp_path: Path) -> None:
    broker = mosquitto_factory()
    bc = broker_config(broker)
    fed = unique_federation("outbox")
    # min 1, max 2 and a long grace: the round stays open, so a second copy is a duplicate
    # (not round_closed).
    config = aggregator_config(bc, fed, min_updates=1, max_updates=2, grace_s=60.0,
                               deadline_s=120.0)
    with running_aggregator(config) as agg:
        first = AgentService(fed, DEVICE, trainer(), AckLostTransport(
            bc, client_id=f"fedmq-device-{DEVICE}-{fed}"),
            outbox=Outbox(tmp_path / "outbox", BIG, 100))
        first.start()
        try:
            wait_until(lambda: agg.stats.accepted == 1, what="the first update was accepted")
        finally:
            first.stop()  # the PUBACK "never came": the update is still in the outbox
        (update_id,) = pending_update_ids(Outbox(tmp_path / "outbox", BIG, 100))
        assert agg.machine.accepted_ids == ((DEVICE, update_id),)

        # The same device, a new process: built from its config, on the same state_dir.
        agent_config = AgentConfig(federation=fed, broker=bc,
                                   device=DeviceConfig(id=DEVICE, state_dir=str(tmp_path)))
        second = AgentService.from_config(agent_config, trainer(1))
        assert pending_update_ids(second.outbox) == {update_id}
        second.start()
        try:
            wait_until(lambda: agg.stats.rejected["duplicate"] >= 1 and len(second.outbox) == 0,
                       what="the pending copy was resent and acknowledged")
        finally:
            second.stop()
        assert second.messages_resent == 1
        # The resent copy (and the update the new process may train for the still-open round)
        # are rejected as duplicates: the update counts once.
        assert agg.stats.accepted == 1
        assert agg.machine.accepted_ids == ((DEVICE, update_id),)
        assert set(agg.stats.rejected) == {"duplicate"}
    assert Outbox(tmp_path / "outbox", BIG, 100).pending() == []


@pytest.mark.broker
def test_delivery_is_done_once_the_broker_acknowledged(
        mosquitto_factory: MosquittoFactory) -> None:
    # Also for a publish made while disconnected: paho queues it and sends it on connect, but
    # its is_published() raises for such a message even after the PUBACK (Delivery copes).
    broker = mosquitto_factory()
    transport = PahoTransport(broker_config(broker), client_id=f"probe-{unique_federation()}")
    early = transport.publish("probe/early", b"x")
    assert not early.done()
    transport.start()
    try:
        assert transport.wait_connected(10)
        wait_until(early.done, what="the early publish was acknowledged")
        broker.kill()
        wait_until(lambda: not transport.connected, what="the client saw the broker go")
        down = transport.publish("probe/down", b"y")
        time.sleep(0.2)
        assert not down.done()
        broker.start()
        wait_until(down.done, what="the publish made while down was acknowledged")
        up = transport.publish("probe/up", b"z")
        wait_until(up.done, what="a publish while connected was acknowledged")
    finally:
        transport.stop()
