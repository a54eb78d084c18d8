"""The trainers in examples/ fit the Trainer contract (docs/trainers.md) and learn.

They are loaded as a device loads them: ``[trainer] kind = "module:make_trainer"`` with the
examples directory as the working directory.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.factory import build_trainer
from device_agent.trainers import TrainConfig, Trainer
from fedmq.config import AgentConfig, DataConfig, DeviceConfig, TrainerConfig
from fedmq.models import Weights, init_mlp

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def in_examples(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The examples directory as the working directory; sys.path and modules restored after."""
    monkeypatch.chdir(EXAMPLES)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in ("linear_regression", "sgd_classifier"):
        sys.modules.pop(name, None)


def load(kind: str, device: str = "dev-1", options: dict[str, Any] | None = None,
         **data: Any) -> Trainer:
    return build_trainer(AgentConfig(
        federation="examples", device=DeviceConfig(id=device), data=DataConfig(**data),
        trainer=TrainerConfig(kind=kind, options=options or {})))


def read_only(weights: Weights) -> Weights:
    """Weights as the agent hands them over: read-only float32 arrays."""
    out = {k: np.array(v, dtype=np.float32) for k, v in weights.items()}
    for array in out.values():
        array.flags.writeable = False
    return out


def assert_same_layout(new: Weights, old: Weights) -> None:
    assert list(new) == list(old)
    for name, array in new.items():
        assert array.shape == old[name].shape, name
        assert array.dtype == np.float32, name


def test_sgd_classifier_fits_the_contract_and_learns(in_examples: None) -> None:
    pytest.importorskip("sklearn")
    trainer = load("sgd_classifier:make_trainer", options={"alpha": 1e-4},
                   num_shards=4, shard=1)
    start = read_only(init_mlp([64, 10], seed=0))  # the built-in softmax model's layout
    before = trainer.evaluate(start)
    config = TrainConfig(epochs=3, batch_size=10, lr=0.1, seed=5)
    result = trainer.fit(start, config, round_seed=1)
    assert_same_layout(result.weights, start)
    # A quarter of the 1347 digits training rows (337), 20 % of them (67) held out.
    assert result.num_examples == 270
    after = trainer.evaluate(result.weights)
    assert after.num_examples == 67
    assert before.accuracy is not None
    assert after.accuracy is not None
    assert after.accuracy > 0.85 > before.accuracy
    assert after.loss < before.loss
    # Seeded from (config.seed, round_seed): a round replays exactly; another round differs.
    again = trainer.fit(start, config, round_seed=1).weights
    other = trainer.fit(start, config, round_seed=2).weights
    np.testing.assert_array_equal(again["dense0.weight"], result.weights["dense0.weight"])
    assert not np.array_equal(other["dense0.weight"], result.weights["dense0.weight"])


def test_sgd_classifier_takes_the_class_count_from_the_model(
        in_examples: None, tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    rng = np.random.default_rng(0)
    data = tmp_path / "local.npz"
    np.savez(data, x=rng.random((60, 64)).astype(np.float32), y=np.arange(60) % 3)
    trainer = load("sgd_classifier:make_trainer", source="npz", path=str(data))
    start = read_only(init_mlp([64, 10], seed=0))  # labels 0..2 here, 10 classes in the model
    result = trainer.fit(start, TrainConfig(epochs=1), round_seed=1)
    assert_same_layout(result.weights, start)


def test_linear_regression_fits_the_contract_and_learns(in_examples: None) -> None:
    trainer = load("linear_regression:make_trainer", device="sensor-9",
                   options={"samples": 300})
    start = read_only({"weight": np.zeros(4, np.float32), "bias": np.zeros((), np.float32)})
    before = trainer.evaluate(start)
    result = trainer.fit(start, TrainConfig(epochs=5, batch_size=16, lr=0.05,
                                            extra={"l2": 0.001}), round_seed=1)
    assert_same_layout(result.weights, start)
    assert result.weights["bias"].shape == ()
    assert result.num_examples == 240  # 300 readings, 60 held out
    after = trainer.evaluate(result.weights)
    assert (before.num_examples, after.accuracy) == (60, None)
    assert after.loss < 0.5  # noise 0.5: the best MSE is about 0.25
    assert before.loss > 100  # the temperature is about 21, predicted 0
    assert set(after.metrics) == {"mae"}
    np.testing.assert_allclose(result.weights["weight"], [1.5, -2.0, 0.5, 3.0], atol=0.15)
