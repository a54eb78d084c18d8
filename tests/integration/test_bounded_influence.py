"""Bounded influence over a real Mosquitto (issue 9): a quorum of overflowing updates, and the
norm bound that makes the same attack harmless.

The aggregator runs on its own worker thread, as in production; every log record of the
``aggregator`` loggers is captured to show that nothing was raised on it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import numpy as np
import pytest

from fedmq.broker import MosquittoBroker
from fedmq.config import LimitsConfig, RobustConfig, StrategyConfig

from fedhelpers import (
    Recorder,
    aggregator_config,
    broker_config,
    random_delta,
    running_aggregator,
    unique_federation,
    update_payload,
    weights_of,
)


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


@pytest.fixture
def captured() -> Iterator[Captured]:
    handler = Captured()
    log = logging.getLogger("aggregator")
    old = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(old)


def _huge(base_model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, 3e38, np.float32) for k, v in base_model.items()}


@pytest.mark.broker
@pytest.mark.parametrize(("server_lr", "reason"), [(2.0, "non_finite_model"),
                                                   (1.0, "change_too_large")])
def test_quorum_of_overflowing_updates_abandons_the_round_and_the_next_opens(
        mosquitto: MosquittoBroker, captured: Captured, server_lr: float, reason: str) -> None:
    fed = unique_federation("abandon")
    broker = broker_config(mosquitto)
    rec = Recorder(broker, fed).start()
    # Unbounded (mode "off"): two updates of +3e38 everywhere make a mean delta of 3e38 per
    # coordinate: times a server learning rate of 2 the new model overflows float32; at 1 it
    # is finite but moves far beyond robust.max_change_norm. Either way it is not published.
    config = dataclasses.replace(
        aggregator_config(broker, fed, min_updates=2, max_updates=2, max_rounds=1),
        robust=RobustConfig(mode="off"), limits=LimitsConfig(max_examples=1000),
        strategy=StrategyConfig(server_lr=server_lr))
    try:
        with running_aggregator(config) as agg:
            rec.wait_for(lambda r: 0 in r.models())
            base = rec.models()[0]
            huge = _huge(weights_of(base))
            for dev in ("a", "b"):
                rec.transport.publish(rec.topics.update(dev), update_payload(
                    fed, dev, huge, num_examples=10**9))
            rec.wait_for(lambda r: any(a.round == 2 for a in r.announcements()))
            assert agg.stats.abandoned == {reason: 1}
            assert agg.stats.rounds_completed == 0
            assert agg.version == 0
            ann = [a for a in rec.announcements() if a.round == 2][-1]
            assert ann.base_version == 0
            assert ann.open
            assert 1 not in rec.models()  # nothing was published for the abandoned round

            # The federation goes on: honest updates close round 2 on the same base.
            rng = np.random.default_rng(3)
            deltas = [random_delta(base, rng, 0.01) for _ in range(2)]
            for dev, delta in zip(("a", "b"), deltas, strict=True):
                rec.transport.publish(rec.topics.update(dev), update_payload(
                    fed, dev, delta, round_=2, num_examples=10))
            assert agg.wait(20), f"round 2 did not close: {dict(agg.stats.rejected)}"
            rec.wait_for(lambda r: 1 in r.models())
            model = weights_of(rec.models()[1])
            for name, b in weights_of(base).items():
                mean = (deltas[0][name].astype(np.float64) + deltas[1][name]) / 2.0
                want = b.astype(np.float64) + server_lr * mean
                np.testing.assert_allclose(model[name], want.astype(np.float32), rtol=1e-6)
    finally:
        rec.stop()
    warnings = captured.lines(logging.WARNING)
    assert any(f"round 1 abandoned: {reason}" in w for w in warnings), warnings
    assert not [r for r in captured.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.mark.broker
def test_same_attack_under_the_default_bound_is_clipped_and_the_round_publishes(
        mosquitto: MosquittoBroker, captured: Captured) -> None:
    fed = unique_federation("clip")
    broker = broker_config(mosquitto)
    rec = Recorder(broker, fed).start()
    config = dataclasses.replace(
        aggregator_config(broker, fed, min_updates=3, max_updates=3, max_rounds=1),
        limits=LimitsConfig(max_examples=1000))
    try:
        with running_aggregator(config) as agg:
            rec.wait_for(lambda r: 0 in r.models())
            base = rec.models()[0]
            rng = np.random.default_rng(4)
            honest = [random_delta(base, rng, 0.01) for _ in range(2)]
            for dev, delta in zip(("a", "b"), honest, strict=True):
                rec.transport.publish(rec.topics.update(dev),
                                      update_payload(fed, dev, delta, num_examples=10))
            rec.transport.publish(rec.topics.update("evil"), update_payload(
                fed, "evil", _huge(weights_of(base)), num_examples=10**9))
            assert agg.wait(20), f"round did not close: {dict(agg.stats.rejected)}"
            rec.wait_for(lambda r: 1 in r.models() and bool(r.summaries()))
            summary = rec.summaries()[-1]
    finally:
        rec.stop()
    assert agg.stats.clipped == 1
    assert summary.metrics["clipped_updates"] == 1.0
    bound = summary.metrics["norm_bound"]
    model = weights_of(rec.models()[1])
    change = np.sqrt(sum(float(np.sum((model[k].astype(np.float64) - v) ** 2))
                         for k, v in weights_of(base).items()))
    # The mean of three updates each at most the bound moves the model at most the bound.
    assert np.isfinite(change)
    assert change <= bound * (1 + 1e-6)
    assert not [r for r in captured.records if r.exc_info or r.levelno >= logging.ERROR]
