"""Asynchronous buffered rounds over a real Mosquitto with real agents (FedBuff).

Three fast agents train whenever a newer model reaches them (paced by ``min_interval_s``); a slow
one is held inside its first ``fit`` (trained from version 0) until the federation has moved on.
A recording subscriber sees every update and model independently of the aggregator. With a wide
``max_staleness`` the slow update is folded with weight 1/sqrt(1 + s); with a narrow one it is
rejected as ``stale`` and counted, and the slow device then trains again from the newest model.
Either way every published model is the previous one plus Σ nᵢ·w(sᵢ)·Δᵢ / Σ nᵢ over exactly
the updates its summary lists.
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from device_agent.service import AgentService
from device_agent.trainers import FitResult, MLPTrainer, TrainConfig
from fedmq.broker import MosquittoBroker
from fedmq.compression import decode_all
from fedmq.config import BrokerConfig, RobustConfig, RoundsConfig, TrainSettings
from fedmq.wire import GlobalModel, ModelUpdate, RoundSummary

from fedhelpers import (
    LAYERS,
    Recorder,
    aggregator_config,
    broker_config,
    running_aggregator,
    unique_federation,
    weights_of,
)

SLOW = "dev-slow"


class HeldTrainer:
    """An MLP trainer whose first ``fit`` waits until ``release`` is set (a slow device)."""

    def __init__(self, inner: MLPTrainer, release: threading.Event) -> None:
        self.inner = inner
        self.release = release

    def fit(self, weights: Any, config: TrainConfig, round_seed: int) -> FitResult:
        assert self.release.wait(60), "the test never released the slow device"
        return self.inner.fit(weights, config, round_seed)

    def evaluate(self, weights: Any) -> Any:
        return self.inner.evaluate(weights)


def _trainer(n: int, seed: int) -> MLPTrainer:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, LAYERS[0])).astype(np.float32)
    return MLPTrainer(x, rng.integers(0, LAYERS[-1], n), LAYERS[-1])


def _fleet(fed: str, broker: BrokerConfig, release: threading.Event) -> list[AgentService]:
    agents = [AgentService.over_mqtt(fed, f"dev-{i}", _trainer(20 + 10 * i, i), broker,
                                     min_interval_s=0.3) for i in range(3)]
    agents.append(AgentService.over_mqtt(fed, SLOW, HeldTrainer(_trainer(40, 9), release),
                                         broker))
    return agents


def _check_every_model(rec: Recorder) -> list[tuple[ModelUpdate, int]]:
    """Each published model against the staleness-weighted mean of its summary's updates;
    returns each accepted update with the staleness it was folded with."""
    models: dict[int, GlobalModel] = rec.models()
    updates = rec.updates()
    folded: list[tuple[ModelUpdate, int]] = []
    for s in sorted(rec.summaries(), key=lambda s: s.version):
        base = s.version - 1
        accepted = [updates[uid] for _, uid in s.accepted]
        prev = weights_of(models[base])
        total = float(sum(u.num_examples for u in accepted))
        staleness = [base - u.base_version for u in accepted]
        assert all(t >= 0 for t in staleness), staleness
        got = weights_of(models[s.version])
        for name, p in prev.items():
            mean = sum(u.num_examples / math.sqrt(1 + t)
                       * decode_all(u.tensors)[name].astype(np.float64)
                       for u, t in zip(accepted, staleness, strict=True)) / total
            np.testing.assert_allclose(got[name], p.astype(np.float64) + mean, rtol=1e-5,
                                       atol=1e-6, err_msg=f"version {s.version} {name}")
        if staleness:
            assert s.metrics["staleness_max"] == max(staleness)
        folded.extend(zip(accepted, staleness, strict=True))
    return folded


def _run(mosquitto: MosquittoBroker, *, max_staleness: int, release_at: int,
         ) -> tuple[Recorder, dict[str, int], list[RoundSummary]]:
    fed = unique_federation("async")
    broker = broker_config(mosquitto)
    rec = Recorder(broker, fed).start()
    release = threading.Event()
    agents = _fleet(fed, broker, release)
    config = replace(
        aggregator_config(broker, fed),
        rounds=RoundsConfig(mode="async", buffer_size=2, min_updates=1, max_staleness=max_staleness,
                            deadline_s=30.0, max_rounds=0),
        robust=RobustConfig(mode="off"),
        train=TrainSettings(epochs=1, batch_size=8, lr=0.1))
    def slow_sent(r: Recorder, count: int = 1) -> bool:
        return sum(u.device_id == SLOW for u in r.updates().values()) >= count

    try:
        for a in agents:
            a.start()
        with running_aggregator(config) as agg:
            rec.wait_for(lambda r: max(r.models(), default=0) >= release_at, timeout=60)
            release.set()
            rec.wait_for(slow_sent, timeout=30)
            # Released, it trains again at once from the newest model it holds.
            rec.wait_for(lambda r: slow_sent(r, 2), timeout=30)
            slow_first = min((u for u in rec.updates().values() if u.device_id == SLOW),
                             key=lambda u: u.base_version)
            # The slow update's fate is in the summary of the buffer it reached, or the next.
            rec.wait_for(lambda r: sum(len(s.accepted) + sum(s.rejected.values())
                                       for s in r.summaries()) >= len(r.updates())
                         and len(r.summaries()) >= release_at + 2, timeout=60)
            agg.stop()
            rejected = dict(agg.stats.rejected)
    finally:
        for a in agents:
            a.stop()
        rec.stop()
    assert slow_first.base_version == 0
    return rec, rejected, rec.summaries()


@pytest.mark.broker
def test_a_stale_update_within_the_window_is_folded_with_a_smaller_weight(
        mosquitto: MosquittoBroker) -> None:
    rec, rejected, _ = _run(mosquitto, max_staleness=50, release_at=3)
    assert rejected == {}
    folded = _check_every_model(rec)
    slow = [(u, t) for u, t in folded if u.device_id == SLOW and u.base_version == 0]
    assert len(slow) == 1
    assert slow[0][1] >= 3  # folded 3 or more versions late, with weight 1/sqrt(1 + s) <= 0.5
    # Fast agents also fold with some staleness, never twice from one version.
    pairs = [(u.device_id, u.base_version) for u, _ in folded]
    assert len(pairs) == len(set(pairs))


@pytest.mark.broker
def test_an_update_staler_than_max_staleness_is_rejected_and_counted(
        mosquitto: MosquittoBroker) -> None:
    rec, rejected, summaries = _run(mosquitto, max_staleness=1, release_at=3)
    assert rejected == {"stale": 1}
    assert sum(s.rejected.get("stale", 0) for s in summaries) == 1
    folded = _check_every_model(rec)
    assert all(t <= 1 for _, t in folded)
    slow = [u.base_version for u, _ in folded if u.device_id == SLOW]
    assert slow, "the slow device's update from a newer model was never folded"
    assert 0 not in slow
