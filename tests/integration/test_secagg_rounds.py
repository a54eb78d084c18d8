"""Secure aggregation over a real Mosquitto: agents train, mask, share and reveal through the
broker; the aggregator publishes the FedAvg of their updates without ever receiving one."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from device_agent.service import AgentService
from device_agent.trainers import MLPTrainer
from fedmq.broker import MosquittoBroker
from fedmq.config import (
    AggregatorConfig,
    BrokerConfig,
    CompressionConfig,
    PrivacyConfig,
    TrainSettings,
)
from fedmq.secagg import codec as secagg_codec
from fedmq.secagg.messages import SecAggMasked
from fedmq.wire import GlobalModel, ModelUpdate

from fedhelpers import (
    LAYERS,
    Recorder,
    aggregator_config,
    broker_config,
    running_aggregator,
    unique_federation,
    weights_of,
)

DEVICES = 6
ROUNDS = 3


def _agents(fed: str, broker: BrokerConfig) -> list[AgentService]:
    rng = np.random.default_rng(0)
    agents = []
    for i in range(DEVICES):
        n = 20 + 10 * i
        x = rng.standard_normal((n, LAYERS[0])).astype(np.float32)
        y = rng.integers(0, LAYERS[-1], n)
        agents.append(AgentService.over_mqtt(fed, f"dev-{i}", MLPTrainer(x, y, LAYERS[-1]),
                                             broker))
    return agents


def _run(broker: BrokerConfig, fed: str, config: AggregatorConfig
         ) -> tuple[dict[int, GlobalModel], Recorder, dict[str, int]]:
    rec = Recorder(broker, fed).start()
    agents = _agents(fed, broker)
    try:
        for a in agents:
            a.start()
        with running_aggregator(config) as agg:
            assert agg.wait(90), f"only {agg.stats.rounds_completed} rounds completed"
            rec.wait_for(lambda r: ROUNDS in r.models())
            rejected = dict(agg.stats.rejected)
    finally:
        for a in agents:
            a.stop()
        rec.stop()
    return rec.models(), rec, rejected


def _config(broker: BrokerConfig, fed: str, secure: bool, codec: str = "fp32",
            chunk: int = 256 * 1024) -> AggregatorConfig:
    return replace(aggregator_config(broker, fed, min_updates=DEVICES, max_updates=DEVICES,
                                     max_rounds=ROUNDS, deadline_s=40.0),
                   train=TrainSettings(epochs=2, batch_size=8, lr=0.1),
                   compression=CompressionConfig(codec=codec, max_chunk_bytes=chunk),  # type: ignore[arg-type]
                   privacy=PrivacyConfig(secure_aggregation=secure))


@pytest.mark.broker
@pytest.mark.parametrize(("codec", "chunk"), [("fp32", 256 * 1024), ("int8", 700)])
def test_secure_rounds_give_the_plain_model(mosquitto: MosquittoBroker, codec: str,
                                            chunk: int) -> None:
    broker = broker_config(mosquitto)
    pfed = unique_federation("plain")
    plain, _, _ = _run(broker, pfed, _config(broker, pfed, False, codec))
    fed = unique_federation("secagg")
    secure, rec, rejected = _run(broker, fed, _config(broker, fed, True, codec, chunk))
    assert rejected == {}  # (reveals after the unmasking are counted as late, not here)
    assert not rec.of(ModelUpdate)  # no device sent a plain update
    masked = [m for m, _ in rec.messages if "/secagg/masked/" in m.topic]
    chunks = [secagg_codec.decode(m.payload) for m in masked]
    assert all(isinstance(c, SecAggMasked) for c in chunks)
    if chunk < 1000:
        assert len(masked) > DEVICES * ROUNDS  # each masked input came in several chunks
    assert sorted(secure) == list(range(ROUNDS + 1))
    for version in range(1, ROUNDS + 1):
        a, b = weights_of(plain[version]), weights_of(secure[version])
        for name in a:
            # fixed point at 2^-frac_bits per device, compounded over the rounds
            np.testing.assert_allclose(b[name], a[name], atol=2e-5)
    assert secure[ROUNDS].metrics.get("participants") == DEVICES
