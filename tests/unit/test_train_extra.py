"""Extra ``[train]`` keys: loaded, announced in the ``train`` map, handed to the trainer as
``TrainConfig.extra`` (issue 10); and what a trainer is given, as docs/trainers.md states it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from aggregator.service import AggregatorService
from device_agent.service import AgentService
from device_agent.trainers import EvalResult, FitResult, TrainConfig, Trainer
from fedmq import codec
from fedmq.config import (
    AggregatorConfig,
    ModelConfig,
    RoundsConfig,
    TrainSettings,
    check_aggregator,
    load_aggregator,
)
from fedmq.errors import ConfigError
from fedmq.memory_transport import MemoryHub, MemoryTransport
from fedmq.models import Weights
from fedmq.topics import Topics
from fedmq.wire import Evaluation, RoundAnnouncement


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aggregator.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_extra_train_keys_load_as_written(tmp_path: Path) -> None:
    cfg = load_aggregator(write(tmp_path, '[train]\nepochs = 2\nseed = 7\nl2 = 0.001\n'
                                          'optimizer = "adam"\nwarmup = 3\n'))
    assert (cfg.train.epochs, cfg.train.seed) == (2, 7)
    assert cfg.train.extra == {"l2": 0.001, "optimizer": "adam", "warmup": 3}
    assert load_aggregator(write(tmp_path, "")).train.extra == {}


@pytest.mark.parametrize(
    ("value", "says"),
    [("true", "must be a number or a string .*write 1 or 0"),
     ("-3", r"must be an integer in \[0, 2\*\*63 - 1\], or a float .*write -3.0 as a float"),
     ("nan", "must be a finite number"),
     ("-inf", "must be a finite number"),
     ("[1, 2]", "must be a number or a string"),
     ("{ a = 1 }", "must be a number or a string"),
     ("1979-05-27", "must be a number or a string")],
    ids=["bool", "negative-int", "nan", "-inf", "list", "table", "date"],
)
def test_extra_train_values_the_wire_cannot_carry_are_one_line(
        tmp_path: Path, value: str, says: str) -> None:
    path = write(tmp_path, f"[train]\nmomentum = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_aggregator(path)
    message = str(info.value)
    assert "\n" not in message
    assert re.match(rf"{re.escape(str(path))}: \[train\] momentum = .* {says}", message), message


def test_the_extra_field_is_not_a_key_of_its_own(tmp_path: Path) -> None:
    # "extra" written in the file is one more extra key, so a table there is refused like any.
    with pytest.raises(ConfigError, match=r"\[train\] extra = \{a = 1\} must be a number"):
        load_aggregator(write(tmp_path, "[train]\nextra = { a = 1 }\n"))


def test_configs_built_in_code_are_checked_too() -> None:
    for extra, says in (({"lr": 0.1}, "'lr' is a \\[train\\] setting"),
                        ({"shuffle": True}, "shuffle = true must be a number or a string"),
                        ({f"k{i}": i for i in range(253)}, "253 extra keys: at most 252")):
        with pytest.raises(ConfigError, match=says):
            check_aggregator(AggregatorConfig(train=TrainSettings(extra=extra)))  # type: ignore[arg-type]


class Recording:
    """A trainer that records what the agent hands it, and moves every weight by +1."""

    def __init__(self) -> None:
        self.configs: list[TrainConfig] = []
        self.given: list[Weights] = []

    def fit(self, weights: Weights, config: TrainConfig, round_seed: int) -> FitResult:
        self.configs.append(config)
        self.given.append(weights)
        return FitResult(weights={k: v + np.float32(1) for k, v in weights.items()},
                         num_examples=3)

    def evaluate(self, weights: Weights) -> EvalResult:
        # A regression has no accuracy: None, and its own metrics instead.
        return EvalResult(loss=0.5, accuracy=None, num_examples=2, metrics={"mae": 0.25})


def federate(config: AggregatorConfig, trainers: dict[str, Trainer]
             ) -> tuple[AggregatorService, dict[str, AgentService], MemoryHub]:
    """An aggregator and one agent per trainer on a MemoryHub, pumped until quiet."""
    hub = MemoryHub()
    agg_transport = MemoryTransport(hub)
    aggregator = AggregatorService(config, agg_transport, clock=lambda: 1_000.0)
    topics = Topics(config.federation)
    agents = {}
    for device, trainer in trainers.items():
        transport = MemoryTransport(hub)
        agents[device] = AgentService(config.federation, device, trainer, transport,
                                      clock=lambda: 1_000.0)
        for topic in (topics.model, topics.round):
            transport.subscribe(topic, qos=1)
        transport.start()
    aggregator.start(connect_timeout=0.0)
    aggregator.stop()
    for _ in range(200):  # deliver until quiet
        busy = False
        for agent in agents.values():
            inbox = agent.transport.inbox
            while not inbox.empty():
                agent.handle_message(inbox.get_nowait())
                busy = True
        while not agg_transport.inbox.empty():
            aggregator.handle_message(agg_transport.inbox.get_nowait())
            aggregator.step()
            busy = True
        aggregator.step()
        if not busy:
            break
    return aggregator, agents, hub


def test_extra_keys_reach_the_trainer_through_a_round() -> None:
    config = AggregatorConfig(
        federation="extra", model=ModelConfig(layers=[3, 2]),
        rounds=RoundsConfig(min_updates=1, max_updates=1, max_rounds=1),
        train=TrainSettings(epochs=2, seed=11, extra={"l2": 0.001, "optimizer": "adam",
                                                      "warmup": 3}))
    check_aggregator(config)
    trainer = Recording()
    aggregator, agents, hub = federate(config, {"dev-1": trainer})
    agent = agents["dev-1"]
    transport = agent.transport
    assert isinstance(transport, MemoryTransport)
    topics = Topics("extra")

    announcement = codec.decode_as(hub.retained[topics.round].payload, RoundAnnouncement)
    assert dict(announcement.train) == {"epochs": 2, "batch_size": 10, "lr": 0.3, "seed": 11,
                                        "l2": 0.001, "optimizer": "adam", "warmup": 3}
    assert len(trainer.configs) == 1
    got = trainer.configs[0]
    assert (got.epochs, got.seed) == (2, 11)
    assert got.extra == {"l2": 0.001, "optimizer": "adam", "warmup": 3}
    # What docs/trainers.md promises about the weights a trainer is given.
    weights = trainer.given[0]
    assert list(weights) == ["dense0.weight", "dense0.bias"]
    for array in weights.values():
        assert array.dtype == np.float32
        assert array.flags.c_contiguous
        assert not array.flags.writeable
    assert aggregator.stats.accepted == 1
    # An evaluation without accuracy is reported with its loss and its own metrics.
    reports = [codec.decode_as(m.payload, Evaluation) for m in transport.published
               if m.topic == topics.eval("dev-1")]
    assert reports
    assert {dict(r.metrics)["mae"] for r in reports} == {0.25}
    assert all(dict(r.metrics) == {"loss": 0.5, "mae": 0.25} for r in reports)
    assert agent.evaluation_errors == 0


def test_train_settings_and_train_config_agree_on_the_known_keys() -> None:
    known = {f.name for f in dataclasses.fields(TrainSettings)} - {"extra"}
    assert known == {f.name for f in dataclasses.fields(TrainConfig)} - {"extra"}
    assert TrainSettings().seed == TrainConfig().seed


# ---------------------------------------------------------------- a trainer that raises


class FailsOnce(Recording):
    """Raises in its first fit (a trainer bug, a sensor read error), then trains normally."""

    def fit(self, weights: Weights, config: TrainConfig, round_seed: int) -> FitResult:
        if not self.configs:
            self.configs.append(config)
            raise RuntimeError("sensor log unreadable")
        return super().fit(weights, config, round_seed)


def test_a_fit_that_raises_costs_one_round_not_the_next() -> None:
    """docs/trainers.md: the exception is logged, the round goes on without the device, and the
    device trains again in the next round (it used to stay 'training' for good)."""
    config = AggregatorConfig(
        federation="raises", model=ModelConfig(layers=[3, 2]),
        rounds=RoundsConfig(min_updates=1, max_updates=2, grace_s=0.0, max_rounds=3))
    # handle_message raises nothing: fit's error is caught (it used to propagate).
    aggregator, agents, _ = federate(config, {"flaky": FailsOnce(), "steady": Recording()})
    flaky = agents["flaky"]
    assert flaky.training_errors == 1
    assert not flaky.machine.training
    # Round 1 went on without it; it sent updates in the rounds after.
    assert flaky.updates_sent >= 1
    assert agents["steady"].updates_sent == 3
    assert aggregator.round >= 3


class NumpyScalars(Recording):
    """Returns numpy scalars where ints and floats belong (np.sum, np.mean give them)."""

    def fit(self, weights: Weights, config: TrainConfig, round_seed: int) -> FitResult:
        result = super().fit(weights, config, round_seed)
        return FitResult(weights=result.weights, num_examples=np.int64(3),  # type: ignore[arg-type]
                         metrics={"train_loss": np.float32(0.5)})  # type: ignore[dict-item]


def test_numpy_scalars_in_a_fit_result_are_sent() -> None:
    config = AggregatorConfig(
        federation="scalars", model=ModelConfig(layers=[3, 2]),
        rounds=RoundsConfig(min_updates=1, max_updates=1, max_rounds=1))
    aggregator, agents, _ = federate(config, {"dev-1": NumpyScalars()})
    assert agents["dev-1"].training_errors == 0
    assert agents["dev-1"].updates_sent == 1
    assert aggregator.stats.accepted == 1
