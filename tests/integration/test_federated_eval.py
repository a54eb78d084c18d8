"""Federated evaluation over a real Mosquitto: the metrics attached to version N are the
example-weighted means of the devices' evaluations of version N on their held-out data, and
`fedmq history list` shows them."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aggregator.history import ModelHistory
from device_agent.factory import split_holdout
from device_agent.service import AgentService
from device_agent.trainers import MLPTrainer
from fedmq.broker import MosquittoBroker
from fedmq.compression import decode_all
from fedmq.config import DurabilityConfig, ModelConfig
from fedmq.datasets import load_digits_split, partition
from fedmq.wire import Evaluation, ModelEvaluation, ModelUpdate

from fedhelpers import Recorder, aggregator_config, broker_config, running_aggregator
from fedhelpers import unique_federation as new_federation

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ROUNDS = 3


def _trainers() -> list[tuple[MLPTrainer, bool]]:
    """Three training devices holding out different fractions (so the weights matter), and
    one evaluation-only device (all of its shard held out)."""
    x, y, _, _ = load_digits_split(0)
    shards = partition(y, 4, "iid", 0)
    out = []
    for i, (idx, fraction) in enumerate(zip(shards, (0.1, 0.3, 0.5, 1.0), strict=True)):
        x_fit, y_fit, x_ev, y_ev = split_holdout(x[idx], y[idx], fraction, seed=i)
        out.append((MLPTrainer(x_fit, y_fit, num_classes=10, holdout=(x_ev, y_ev)),
                    fraction < 1.0))
    return out


def test_version_metrics_are_the_weighted_mean_of_the_devices_evaluations(
        mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    broker = broker_config(mosquitto)
    fed = new_federation("feval")
    state = tmp_path / "state"
    config = dataclasses.replace(
        aggregator_config(broker, fed, min_updates=3, max_updates=3, max_rounds=ROUNDS),
        model=ModelConfig(layers=[64, 16, 10], seed=0),
        durability=DurabilityConfig(state_dir=str(state)))
    trainers = _trainers()
    recorder = Recorder(broker, fed).start()
    agents = [AgentService.over_mqtt(fed, f"dev-{i}", trainer, broker, train=train)
              for i, (trainer, train) in enumerate(trainers)]
    try:
        for agent in agents:
            agent.start()
        with running_aggregator(config) as agg:
            assert agg.wait(90), "the federation did not finish its rounds"
            # The run ends once every participant scored the final model (or 5 s passed).
            assert agg.telemetry.evaluated(ROUNDS) is not None
        recorder.wait_for(lambda r: any(e.version == ROUNDS and e.devices == 4
                                        for e in r.of(ModelEvaluation)))
    finally:
        for agent in agents:
            agent.stop()
        recorder.stop()

    # The evaluation-only device trained nothing; the three others trained every round.
    assert agents[3].updates_sent == 0
    assert agents[3].ignored["evaluate_only"] == ROUNDS
    assert [a.updates_sent for a in agents[:3]] == [ROUNDS] * 3
    assert all(a.evaluations_sent == ROUNDS + 1 for a in agents)  # versions 0..ROUNDS
    # Updates carry training metrics only, named as such.
    assert all(set(u.metrics) == {"train_loss", "train_accuracy"}
               for u in recorder.of(ModelUpdate))
    assert len(recorder.of(Evaluation)) == 4 * (ROUNDS + 1)

    history = ModelHistory(state / "models", keep=10)
    latest = {e.version: e for e in recorder.of(ModelEvaluation)}  # the last one per version
    for version in range(ROUNDS + 1):
        model = history.load(version)
        weights = decode_all(model.tensors)
        # Evaluate each device's held-out split here, independently, and weigh by its size.
        results = [t.evaluate(weights) for t, _ in trainers]
        n = sum(r.num_examples for r in results)
        accuracy = sum((r.accuracy or 0.0) * r.num_examples for r in results) / n
        assert all(r.accuracy is not None for r in results)
        loss = sum(r.loss * r.num_examples for r in results) / n
        m = model.metrics
        assert m["eval_examples"] == n
        assert m["eval_devices"] == 4
        assert m["eval_accuracy"] == pytest.approx(accuracy, rel=1e-9)
        assert m["eval_loss"] == pytest.approx(loss, rel=1e-6)
        published = latest[version]
        assert published.devices == 4
        assert published.num_examples == n
        assert set(published.metrics) == {k for k in m if k.startswith("eval_")}
        for key, value in published.metrics.items():
            assert value == pytest.approx(m[key], rel=1e-12)
        if version:
            # Train metrics stay, from the round that produced this version.
            assert {"train_loss", "train_accuracy", "participants", "bytes_in"} <= set(m)
            assert m["participants"] == 3
    first = history.load(1).metrics["eval_accuracy"]
    last = history.load(ROUNDS).metrics["eval_accuracy"]
    assert last > first > history.load(0).metrics["eval_accuracy"]

    _history_list_shows_them(state / "models", history)


def _history_list_shows_them(directory: Path, history: ModelHistory) -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "history", "list", "--dir", str(directory)],
        capture_output=True, text=True, timeout=60, check=True).stdout
    for version in range(ROUNDS + 1):
        row = next(line for line in listed.splitlines()
                   if re.match(rf"\s*{version}\s", line))
        shown = float(re.search(r"eval_accuracy=([0-9.]+)", row).group(1))  # type: ignore[union-attr]
        assert shown == pytest.approx(history.load(version).metrics["eval_accuracy"], abs=1e-4)
        assert np.isfinite(shown)
