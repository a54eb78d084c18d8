"""The round rules once for real, with a real clock and broker (unit tests use a fake clock)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedmq.broker import MosquittoBroker

from fedhelpers import (
    Recorder,
    aggregator_config,
    assert_fedavg,
    broker_config,
    random_delta,
    running_aggregator,
    unique_federation,
    update_payload,
)


@pytest.mark.broker
def test_silent_devices_round_closes_at_quorum_plus_grace(mosquitto: MosquittoBroker) -> None:
    """Four devices expected, two answer: the round closes grace_s after the quorum."""
    fed = unique_federation("grace")
    broker = broker_config(mosquitto)
    rec = Recorder(broker, fed).start()
    grace = 1.0
    config = aggregator_config(broker, fed, min_updates=2, max_updates=4, grace_s=grace,
                               deadline_s=30.0)
    try:
        with running_aggregator(config):
            rec.wait_for(lambda r: 0 in r.models())
            base = rec.models()[0]
            rng = np.random.default_rng(1)
            for dev in ("a", "b"):
                rec.transport.publish(rec.topics.update(dev),
                                      update_payload(fed, dev, random_delta(base, rng)))
            quorum_at = time.monotonic()
            rec.wait_for(lambda r: 1 in r.models(), timeout=10)
            waited = time.monotonic() - quorum_at
        summary = rec.summaries()[0]
        assert summary.closed_by == "grace"
        assert summary.participants == 2
        assert grace * 0.8 <= waited < grace + 2.0, waited
    finally:
        rec.stop()


@pytest.mark.broker
def test_below_quorum_extends_the_deadline(mosquitto: MosquittoBroker) -> None:
    """Policy "extend": the same round is re-announced with a later deadline, updates kept."""
    fed = unique_federation("extend")
    broker = broker_config(mosquitto)
    rec = Recorder(broker, fed).start()
    config = aggregator_config(broker, fed, min_updates=2, max_updates=2, deadline_s=1.0,
                               below_quorum="extend")
    try:
        with running_aggregator(config):
            rec.wait_for(lambda r: 0 in r.models())
            base = rec.models()[0]
            rng = np.random.default_rng(2)
            rec.transport.publish(rec.topics.update("a"), update_payload(
                fed, "a", random_delta(base, rng), update_id="a1", num_examples=5))
            rec.wait_for(lambda r: len(r.announcements()) >= 2, timeout=10)
            first, second = rec.announcements()[:2]
            assert (second.round, second.base_version) == (first.round, first.base_version)
            assert second.deadline > first.deadline
            assert 1 not in rec.models()  # still open: nothing published
            rec.transport.publish(rec.topics.update("b"), update_payload(
                fed, "b", random_delta(base, rng), update_id="b1", num_examples=15))
            rec.wait_for(lambda r: 1 in r.models(), timeout=10)
        summary = rec.summaries()[0]
        assert sorted(uid for _, uid in summary.accepted) == ["a1", "b1"]
        updates = rec.updates()
        assert_fedavg(rec.models()[1], base, [updates["a1"], updates["b1"]])
    finally:
        rec.stop()


@pytest.mark.broker
def test_below_quorum_reannounce_discards_the_partial_round(mosquitto: MosquittoBroker) -> None:
    """Policy "reannounce": round 1 is abandoned, round 2 opens on the same base version."""
    fed = unique_federation("reann")
    broker = broker_config(mosquitto)
    rec = Recorder(broker, fed).start()
    config = aggregator_config(broker, fed, min_updates=2, max_updates=2, deadline_s=1.0,
                               below_quorum="reannounce")
    try:
        with running_aggregator(config):
            rec.wait_for(lambda r: 0 in r.models())
            base = rec.models()[0]
            rng = np.random.default_rng(4)
            rec.transport.publish(rec.topics.update("a"), update_payload(
                fed, "a", random_delta(base, rng), update_id="lost"))
            rec.wait_for(lambda r: any(a.round == 2 for a in r.announcements()), timeout=10)
            r2 = next(a for a in rec.announcements() if a.round == 2)
            assert r2.base_version == 0
            assert r2.open
            for dev in ("a", "b"):
                rec.transport.publish(rec.topics.update(dev), update_payload(
                    fed, dev, random_delta(base, rng), round_=2, update_id=f"{dev}2"))
            rec.wait_for(lambda r: 1 in r.models(), timeout=10)
        summary = rec.summaries()[0]
        assert summary.round == 2
        assert sorted(uid for _, uid in summary.accepted) == ["a2", "b2"]
        updates = rec.updates()
        assert_fedavg(rec.models()[1], base, [updates["a2"], updates["b2"]])
    finally:
        rec.stop()
