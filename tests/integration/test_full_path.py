"""The whole path over a real Mosquitto: agents train, the aggregator folds, the model is FedAvg.

A test subscriber records every update and model independently of the aggregator; after R rounds
each published model must equal the previous one plus the weighted mean of exactly the updates
the round summary lists as accepted.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from device_agent.service import AgentService
from device_agent.trainers import MLPTrainer
from fedmq.broker import MosquittoBroker
from fedmq.config import BrokerConfig, TrainSettings

from fedhelpers import (
    LAYERS,
    Recorder,
    aggregator_config,
    broker_config,
    fedavg,
    running_aggregator,
    unique_federation,
    weights_of,
)

ROUNDS = 3
DEVICES = 3


def _agents(fed: str, broker: BrokerConfig, sizes: list[int], seed: int) -> list[AgentService]:
    """One MQTT agent per size, ``dev-0``, ``dev-1``, ..., each with random data of that size."""
    rng = np.random.default_rng(seed)
    agents = []
    for i, n in enumerate(sizes):
        x = rng.standard_normal((n, LAYERS[0])).astype(np.float32)
        y = rng.integers(0, LAYERS[-1], n)
        agents.append(AgentService.over_mqtt(fed, f"dev-{i}", MLPTrainer(x, y, LAYERS[-1]),
                                             broker))
    return agents


@pytest.mark.broker
def test_model_after_r_rounds_is_fedavg_of_accepted_updates(mosquitto: MosquittoBroker) -> None:
    fed = unique_federation("path")
    broker = broker_config(mosquitto)
    rec = Recorder(broker, fed).start()
    # Unequal sizes, so the weighting matters.
    agents = _agents(fed, broker, [20 + 10 * i for i in range(DEVICES)], seed=0)
    config = replace(aggregator_config(broker, fed, min_updates=DEVICES, max_updates=DEVICES,
                                       max_rounds=ROUNDS),
                     train=TrainSettings(epochs=2, batch_size=8, lr=0.1))
    try:
        for a in agents:
            a.start()
        with running_aggregator(config) as agg:
            assert agg.wait(60), f"only {agg.stats.rounds_completed} rounds completed"
            rec.wait_for(lambda r: ROUNDS in r.models() and len(r.summaries()) == ROUNDS)
            assert sum(agg.stats.rejected.values()) == 0
    finally:
        for a in agents:
            a.stop()
        rec.stop()

    models = rec.models()
    updates = rec.updates()
    assert sorted(models) == list(range(ROUNDS + 1))
    for summary in sorted(rec.summaries(), key=lambda s: s.version):
        accepted = [updates[uid] for _, uid in summary.accepted]
        assert len(accepted) == DEVICES
        assert {u.round for u in accepted} == {summary.round}
        assert {u.base_version for u in accepted} == {summary.version - 1}
        expected = fedavg(weights_of(models[summary.version - 1]), accepted)
        got = weights_of(models[summary.version])
        assert list(got) == list(expected)
        for name in got:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, atol=1e-7)
        # The model really moved: the test would pass vacuously on zero deltas otherwise.
        assert any(np.abs(got[n] - weights_of(models[summary.version - 1])[n]).max() > 1e-4
                   for n in got)


@pytest.mark.broker
def test_running_agents_follow_an_aggregator_restarted_without_state(
        mosquitto: MosquittoBroker) -> None:
    # A rollback or a restart without [durability] state_dir: the new aggregator publishes version
    # 0 and round 1 again. The agents keep running and must train for it (they hold version 2).
    fed = unique_federation("rerun")
    broker = broker_config(mosquitto)
    agents = _agents(fed, broker, [16] * DEVICES, seed=1)
    config = replace(aggregator_config(broker, fed, min_updates=DEVICES, max_updates=DEVICES,
                                       max_rounds=2),
                     train=TrainSettings(epochs=1, batch_size=8, lr=0.1))
    try:
        for a in agents:
            a.start()
        with running_aggregator(config) as first:
            assert first.wait(60), f"only {first.stats.rounds_completed} rounds completed"
        assert first.version == 2
        with running_aggregator(replace(config, rounds=replace(config.rounds, max_rounds=1))
                                ) as second:
            assert second.run > first.run
            assert second.wait(60), "the running agents did not train for the new run"
            assert (second.version, second.stats.accepted) == (1, DEVICES)
            assert sum(second.stats.rejected.values()) == 0
    finally:
        for a in agents:
            a.stop()
    assert all(a.updates_sent == 3 for a in agents)
    assert all(a.machine.run == second.run for a in agents)
