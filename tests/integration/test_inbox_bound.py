"""The aggregator's inbox stays under its byte cap over a real Mosquitto, however many updates
a round takes (Mosquitto 2.0.11's in-flight cap does not bound what it sends a client that
acknowledges; docs/learning.md, "The learning bench"), and a transport whose inbox is full
still stops."""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from aggregator.startup import inbox_bytes
from fedmq.broker import MosquittoBroker
from fedmq.config import DurabilityConfig, ModelConfig
from fedmq.inbox import ByteBoundedQueue
from fedmq.topics import Topics
from fedmq.transport import PahoTransport

from fedhelpers import (
    Recorder,
    aggregator_config,
    broker_config,
    running_aggregator,
    unique_federation,
    update_payload,
)

#: About 135,000 parameters: a 0.54 MB fp32 update, so 120 of them are 65 MB, eight times the
#: inbox's cap (its 8 MiB floor).
LAYERS = [64, 1024, 64, 10]
UPDATES = 120


@pytest.mark.broker
def test_a_round_of_many_large_updates_never_fills_the_inbox_past_its_cap(
        mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    bc = broker_config(mosquitto)
    fed = unique_federation()
    config = aggregator_config(bc, fed, min_updates=UPDATES, max_updates=UPDATES,
                               deadline_s=120.0, grace_s=0.0)
    config = dataclasses.replace(
        config, model=ModelConfig(layers=LAYERS, seed=0),
        durability=DurabilityConfig(state_dir=str(tmp_path / "state")))  # manual acks
    rec = Recorder(bc, fed).start()
    publisher = PahoTransport(bc, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    publisher.start()
    try:
        assert publisher.wait_connected(10)
        with running_aggregator(config) as agg:
            inbox = agg.transport.inbox
            assert isinstance(inbox, ByteBoundedQueue)
            cap = inbox_bytes(agg.spec.total)
            assert inbox.max_bytes == cap
            rec.wait_for(lambda r: bool(r.announcements()))
            rng = np.random.default_rng(0)
            delta = {k: (rng.standard_normal(v.shape) * 1e-3).astype(np.float32)
                     for k, v in agg.model.items()}
            topics = Topics(fed)
            sent = [publisher.publish(topics.update(f"d{i:03d}"),
                                      update_payload(fed, f"d{i:03d}", delta))
                    for i in range(UPDATES)]
            rec.wait_for(lambda r: 1 in r.models(), timeout=120)
            assert all(d.done() for d in sent)
            (summary,) = rec.summaries()
            assert len(summary.accepted) == UPDATES  # nothing lost to the back-pressure
            assert summary.rejected == {}
            peak = inbox.peak_bytes
        assert peak <= cap, f"the inbox held {peak} bytes; its cap is {cap}"
        # The updates came faster than the worker folded them: the cap, not an idle worker,
        # is what bounded the inbox (it reached 95% of it on a 2-core machine).
        assert peak > cap // 2, f"the inbox peaked at only {peak} of {cap} bytes"
    finally:
        publisher.stop()
        rec.stop()


@pytest.mark.broker
def test_a_transport_whose_inbox_is_full_stops_promptly(mosquitto: MosquittoBroker) -> None:
    """paho's thread waits in ``put`` for room nobody will make; ``stop()`` must not hang."""
    bc = broker_config(mosquitto)
    topic = f"t/{uuid.uuid4().hex}"
    sub = PahoTransport(bc, client_id=f"sub-{uuid.uuid4().hex[:8]}", inbox_bytes=250_000,
                        manual_ack=True)
    sub.subscribe(topic, qos=1)
    sub.start()
    pub = PahoTransport(bc, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    pub.start()
    try:
        assert sub.wait_connected(10)
        assert pub.wait_connected(10)
        time.sleep(0.2)  # the SUBACK
        for _ in range(10):
            pub.publish(topic, b"x" * 100_000)
        inbox = sub.inbox
        assert isinstance(inbox, ByteBoundedQueue)
        end = time.monotonic() + 10
        while inbox.qsize() < 2 and time.monotonic() < end:
            time.sleep(0.02)
        time.sleep(0.3)  # a third message is read and waits for room
        assert inbox.qsize() == 2
        assert inbox.bytes == 200_000
    finally:
        started = time.monotonic()
        sub.stop()
        took = time.monotonic() - started
        pub.stop()
    assert took < 5.0, f"stop() took {took:.1f} s with a full inbox"
