"""Chunked updates and a chunked model through a Mosquitto with ``max_packet_size 65536``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest

from aggregator.service import AggregatorService
from device_agent.service import AgentService
from device_agent.trainers import MLPTrainer
from fedmq import codec, compression
from fedmq.broker import MosquittoBroker, default_config_dir
from fedmq.chunking import place, split_update
from fedmq.config import (
    AggregatorConfig,
    BrokerConfig,
    CompressionConfig,
    ModelConfig,
    TrainSettings,
)
from fedmq.models import init_mlp
from fedmq.subscriber import ModelSubscriber
from fedmq.wire import ModelUpdate, Tensor

from fedhelpers import Recorder, aggregator_config, broker_config, unique_federation

LIMIT = 65536
# 80,200 parameters: 320 kB as fp32 and 80 kB as int8, larger than one packet either way.
LAYERS = [400, 200]


@pytest.fixture
def small_packets(mosquitto_factory: Any, tmp_path: Path) -> MosquittoBroker:
    template = tmp_path / "small-packets.conf"
    template.write_text((default_config_dir() / "dev.conf").read_text()
                        + f"\n# the chunking test\nmax_packet_size {LIMIT}\n")
    broker: MosquittoBroker = mosquitto_factory(template)
    return broker


def _config(broker: BrokerConfig, fed: str, codec_name: Literal["fp32", "int8"],
            **rounds: Any) -> AggregatorConfig:
    cfg = aggregator_config(broker, fed, **rounds)
    return dataclasses.replace(cfg, model=ModelConfig(layers=LAYERS, seed=3),
                               train=TrainSettings(epochs=1, batch_size=16, lr=0.05),
                               compression=CompressionConfig(codec=codec_name))


@pytest.mark.broker
@pytest.mark.parametrize("codec_name", ["fp32", "int8"])
def test_chunked_updates_and_model_over_a_small_packet_broker(
        small_packets: MosquittoBroker, codec_name: Literal["fp32", "int8"]) -> None:
    broker = broker_config(small_packets)
    fed = unique_federation("chunk")
    rec = Recorder(broker, fed).start()
    rng = np.random.default_rng(0)
    agents = []
    for i in range(2):
        n = 40 + 20 * i
        x = rng.standard_normal((n, LAYERS[0])).astype(np.float32)
        agents.append(AgentService.over_mqtt(
            fed, f"dev-{i}", MLPTrainer(x, rng.integers(0, LAYERS[-1], n), LAYERS[-1]), broker))
    agg = AggregatorService(_config(broker, fed, codec_name))
    try:
        for a in agents:
            a.start()
        agg.start()
        assert agg.wait(60), f"rejected: {dict(agg.stats.rejected)}"
        rec.wait_for(lambda r: bool(r.summaries()))
        assert agg.transport.max_packet_size == LIMIT
        assert sum(agg.stats.rejected.values()) == 0
    finally:
        agg.stop()
        for a in agents:
            a.stop()
    rec.drain()
    update_sizes = [len(m.payload) for m, d in rec.messages if isinstance(d, ModelUpdate)]
    chunks = rec.of(ModelUpdate)
    assert len(chunks) > 2  # each update was split
    assert max(update_sizes) <= LIMIT
    model_msgs = [m for m, _ in rec.messages if m.topic.startswith(rec.topics.model)]
    assert any("/model/part/" in m.topic for m in model_msgs)
    assert max(len(m.payload) for m in model_msgs) <= LIMIT

    _check_model_is_fedavg_of_chunks(broker, fed, rec, chunks)


def _check_model_is_fedavg_of_chunks(broker: BrokerConfig, fed: str, rec: Recorder,
                                     chunks: list[ModelUpdate]) -> None:
    """The new model is FedAvg of what the chunks carried, rebuilt independently."""
    shapes = {k: v.shape for k, v in weights_of_initial(LAYERS).items()}
    base_sub = ModelSubscriber(broker, fed).start()
    try:
        latest = base_sub.wait_for_version(1, timeout=10)  # a late subscriber, from retained parts
    finally:
        base_sub.stop()
    assert latest is not None
    assert latest.version == 1
    summary = rec.summaries()[0]
    assert summary.participants == 2
    # The model never fits one packet: the model topic carried manifests only.
    assert all(m.chunks > 1 and not m.tensors for m in rec.models().values())
    deltas: dict[str, list[Tensor]] = {}
    weights: dict[str, int] = {}
    for c in chunks:
        deltas.setdefault(c.device_id, []).extend(c.tensors)
        weights[c.device_id] = c.num_examples
    dense = {d: place(((t, compression.decode_range(t)) for t in ts), shapes)
             for d, ts in deltas.items()}
    base = weights_of_initial(LAYERS)
    total = sum(weights.values())
    got = ModelSubscriber.weights(latest)
    for name in base:
        mean = sum(dense[d][name].astype(np.float64) * w for d, w in weights.items()) / total
        np.testing.assert_allclose(got[name], (base[name] + mean).astype(np.float32),
                                   rtol=1e-6, atol=1e-7)
    assert any(np.abs(got[n] - base[n]).max() > 1e-5 for n in base)
    rec.stop()


def weights_of_initial(layers: list[int]) -> dict[str, np.ndarray]:
    return init_mlp(layers, 3)


@pytest.mark.broker
def test_an_update_missing_a_chunk_cannot_corrupt_the_model(small_packets: MosquittoBroker) -> None:
    """Two complete updates and one that loses its last chunk: documented per-coordinate mean."""
    broker = broker_config(small_packets)
    fed = unique_federation("lost")
    rec = Recorder(broker, fed).start()
    agg = AggregatorService(_config(broker, fed, "fp32", min_updates=2, max_updates=3,
                                    grace_s=1.0))
    agg.start()
    try:
        base = weights_of_initial(LAYERS)
        rng = np.random.default_rng(1)
        sent: dict[str, tuple[dict[str, np.ndarray], int, list[ModelUpdate]]] = {}
        for dev, n in (("a", 10), ("b", 30), ("x", 20)):
            delta = {k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32)
                     for k, v in base.items()}
            whole = ModelUpdate(federation=fed, device_id=dev, round=1, base_version=0,
                                update_id=f"{dev}-1", num_examples=n,
                                tensors=compression.encode_all(delta))
            parts = split_update(whole, delta, compression.encode, LIMIT - 1024)
            assert len(parts) >= 3
            sent[dev] = (delta, n, parts)
        for dev in ("x", "a", "b"):
            delta, n, parts = sent[dev]
            for p in parts if dev != "x" else parts[:-1]:
                rec.transport.publish(rec.topics.update(dev), codec.encode(p))
        rec.wait_for(lambda r: bool(r.summaries()), timeout=15)
        summary = rec.summaries()[0]
        assert summary.participants == 2
        assert summary.metrics.get("incomplete_updates") == 1.0
        assert sorted(uid for _, uid in summary.accepted) == ["a-1", "b-1"]
        sub = ModelSubscriber(broker, fed).start()
        latest = sub.wait_for_version(1, timeout=10)
        sub.stop()
        assert latest is not None
        got = ModelSubscriber.weights(latest)
        covered = {k: np.zeros(v.size, bool) for k, v in base.items()}
        for p in sent["x"][2][:-1]:
            for t in p.tensors:
                covered[t.name][t.offset:t.offset + t.span] = True
        for name, b in base.items():
            num = sum(sent[d][0][name].astype(np.float64) * sent[d][1] for d in ("a", "b"))
            den = 40.0
            with_x = (num + sent["x"][0][name].astype(np.float64) * 20) / (den + 20)
            expected = b + np.where(covered[name].reshape(b.shape), with_x, num / den)
            np.testing.assert_allclose(got[name], expected.astype(np.float32), rtol=1e-6,
                                       atol=1e-7)
    finally:
        agg.stop()
        rec.stop()
