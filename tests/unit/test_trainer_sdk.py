"""The device SDK: custom trainers named in ``[trainer]``, checked at start-up (issue 10)."""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from aggregator.service import AggregatorService
from aggregator.startup import initial_weights
from device_agent.factory import build_trainer
from device_agent.service import AgentService
from device_agent.trainers import (
    EvalResult,
    FitResult,
    MLPTrainer,
    SoftmaxTrainer,
    TrainConfig,
    check_trainer,
)
from fedmq import codec
from fedmq.compression import decode_all
from fedmq.config import (
    AgentConfig,
    AggregatorConfig,
    DataConfig,
    DeviceConfig,
    ModelConfig,
    RoundsConfig,
    TrainerConfig,
)
from fedmq.errors import ConfigError
from fedmq.memory_transport import MemoryHub, MemoryTransport
from fedmq.models import Weights, init_mlp
from fedmq.topics import Topics
from fedmq.wire import GlobalModel

# A user trainer module as one would keep it next to agent.toml; the factory takes the config.
TRAINER_MODULE = '''
import numpy as np

from device_agent.trainers import MLPTrainer


def make(config):
    rng = np.random.default_rng(0)
    return MLPTrainer(rng.normal(size=(6, 4)).astype(np.float32),
                      rng.integers(0, 3, size=6), num_classes=3)
'''


def agent_config(kind: str, **data: object) -> AgentConfig:
    return AgentConfig(federation="sdk", device=DeviceConfig(id="dev-1"),
                       data=DataConfig(**data),  # type: ignore[arg-type]
                       trainer=TrainerConfig(kind=kind))


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``tmp_path`` as the working directory, with ``sys.path`` as the console script has it.

    The ``fedmq`` console script's ``sys.path`` holds its own bin directory, not the working
    directory; pytest's may hold ``''`` (the working directory) or the repo, so both go.
    """
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    return tmp_path


def write_module(workdir: Path, name: str, source: str) -> None:
    (workdir / f"{name}.py").write_text(textwrap.dedent(source))
    sys.modules.pop(name, None)


def test_factory_module_is_imported_from_the_working_directory(workdir: Path) -> None:
    write_module(workdir, "sdk_cwd_trainer", TRAINER_MODULE)
    try:
        service = AgentService.from_config(agent_config("sdk_cwd_trainer:make"))
        assert type(service.trainer).__name__ == "MLPTrainer"
    finally:
        sys.modules.pop("sdk_cwd_trainer", None)


@pytest.mark.parametrize(("kind", "missing"), [
    ("sdk_no_such_module:make", "sdk_no_such_module"),
    ("sdk_cwd_trainer2:nope", "nope"),
])
def test_missing_factory_is_one_config_error_naming_the_key(
        workdir: Path, kind: str, missing: str) -> None:
    write_module(workdir, "sdk_cwd_trainer2", TRAINER_MODULE)
    try:
        with pytest.raises(ConfigError) as info:
            build_trainer(agent_config(kind))
    finally:
        sys.modules.pop("sdk_cwd_trainer2", None)
    message = str(info.value)
    assert "[trainer] kind" in message
    assert missing in message
    assert "\n" not in message


# ---------------------------------------------------------------- the trainer is checked at start


BAD_TRAINERS = {
    # fit without round_seed: used to fail only at the first round, the agent staying up idle
    "two_arg_fit": ("def fit(self, weights, config): ...\n"
                    "def evaluate(self, weights): ...", "fit"),
    "extra_required_fit": ("def fit(self, weights, config, round_seed, extra): ...\n"
                           "def evaluate(self, weights): ...", "fit"),
    "no_evaluate": ("def fit(self, weights, config, round_seed): ...", "evaluate"),
    "evaluate_needs_two": ("def fit(self, weights, config, round_seed): ...\n"
                           "def evaluate(self, weights, data): ...", "evaluate"),
    "fit_not_callable": ("fit = 3\n"
                         "def evaluate(self, weights): ...", "fit"),
}

GOOD_TRAINERS = {
    "plain": "def fit(self, weights, config, round_seed): ...\ndef evaluate(self, weights): ...",
    "defaults": ("def fit(self, weights, config, round_seed=0, verbose=False): ...\n"
                 "def evaluate(self, weights, *, batch=64): ..."),
    "varargs": "def fit(self, *args, **kwargs): ...\ndef evaluate(self, *args): ...",
}


def trainer_module(body: str) -> str:
    return "class T:\n" + textwrap.indent(body, "    ") + "\n\ndef make(config):\n    return T()\n"


@pytest.mark.parametrize("case", sorted(BAD_TRAINERS))
def test_a_trainer_with_a_wrong_signature_fails_at_start(workdir: Path, case: str) -> None:
    body, method = BAD_TRAINERS[case]
    name = f"sdk_bad_{case}"
    write_module(workdir, name, trainer_module(body))
    try:
        with pytest.raises(ConfigError) as info:
            AgentService.from_config(agent_config(f"{name}:make"))
    finally:
        sys.modules.pop(name, None)
    message = str(info.value)
    assert "[trainer] kind" in message
    assert f"{method}(" in message
    assert "\n" not in message


@pytest.mark.parametrize("case", sorted(GOOD_TRAINERS))
def test_lenient_trainer_signatures_are_accepted(workdir: Path, case: str) -> None:
    name = f"sdk_good_{case}"
    write_module(workdir, name, trainer_module(GOOD_TRAINERS[case]))
    try:
        service = AgentService.from_config(agent_config(f"{name}:make"))
    finally:
        sys.modules.pop(name, None)
    assert type(service.trainer).__name__ == "T"


def test_the_cli_reports_a_wrong_trainer_in_one_line_with_exit_code_2(
        workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fedmq.cli import main

    write_module(workdir, "sdk_cli_bad", trainer_module(BAD_TRAINERS["two_arg_fit"][0]))
    (workdir / "agent.toml").write_text(
        'federation = "sdk"\n[device]\nid = "dev-1"\n[trainer]\nkind = "sdk_cli_bad:make"\n')
    try:
        code = main(["agent", "--config", "agent.toml"])
    finally:
        sys.modules.pop("sdk_cli_bad", None)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("fedmq agent: ")
    assert "[trainer] kind" in err
    assert "round_seed" in err
    assert "\n" not in err


def test_the_built_in_trainers_pass_the_check() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(4, 3)).astype(np.float32), np.array([0, 1, 2, 0])
    for cls in (MLPTrainer, SoftmaxTrainer):
        check_trainer(cls(x, y, num_classes=3))


def test_a_trainer_passed_in_is_checked_too() -> None:
    class NoRoundSeed:
        def fit(self, weights: object, config: object) -> None: ...
        def evaluate(self, weights: object) -> None: ...

    with pytest.raises(TypeError, match=r"fit\(weights, config, round_seed\)"):
        AgentService.from_config(agent_config("mlp"), NoRoundSeed())  # type: ignore[arg-type]


# ---------------------------------------------------------------- a scalar tensor in the model


class ShiftTrainer:
    """Adds 0.5 to every tensor, keeping its shape (a scalar stays a scalar)."""

    def fit(self, weights: Weights, config: TrainConfig, round_seed: int) -> FitResult:
        out = {k: np.asarray(v + np.float32(0.5), dtype=np.float32) for k, v in weights.items()}
        return FitResult(weights=out, num_examples=4)

    def evaluate(self, weights: Weights) -> EvalResult:
        return EvalResult(loss=0.0, accuracy=1.0, num_examples=4)


def test_a_scalar_tensor_keeps_shape_0d_through_a_round(tmp_path: Path) -> None:
    path = tmp_path / "model.npz"
    arrays: dict[str, npt.NDArray[np.float32]] = {
        "dense0.weight": np.ones((3, 2), np.float32), "dense0.bias": np.zeros(2, np.float32),
        "temperature": np.array(2.0, np.float32)}  # shape ()
    np.savez(path, **arrays)  # type: ignore[arg-type]
    config = AggregatorConfig(
        federation="sdk", model=ModelConfig(path=str(path)),
        rounds=RoundsConfig(min_updates=1, max_updates=1, deadline_s=60.0, grace_s=5.0,
                            max_rounds=1))
    assert initial_weights(config)["temperature"].shape == ()

    hub = MemoryHub()
    now = [1_000.0]
    agg_transport = MemoryTransport(hub)
    aggregator = AggregatorService(config, agg_transport, clock=lambda: now[0])
    assert aggregator.model["temperature"].shape == ()
    transport = MemoryTransport(hub)
    agent = AgentService("sdk", "dev-1", ShiftTrainer(), transport, clock=lambda: now[0])
    topics = Topics("sdk")
    transport.subscribe(topics.model, qos=1)
    transport.subscribe(topics.round, qos=1)
    transport.start()
    aggregator.start(connect_timeout=0.0)
    aggregator.stop()
    for _ in range(100):  # deliver until quiet, as tests/unit/test_services.py's Fleet.pump
        busy = False
        while not transport.inbox.empty():
            agent.handle_message(transport.inbox.get_nowait())
            busy = True
        while not agg_transport.inbox.empty():
            aggregator.handle_message(agg_transport.inbox.get_nowait())
            aggregator.step()
            busy = True
        aggregator.step()
        if not busy:
            break

    models = [codec.decode_as(m.payload, GlobalModel) for m in agg_transport.published
              if m.topic == topics.model]
    shapes = {t.name: tuple(t.shape) for t in models[0].tensors}
    assert shapes["temperature"] == ()
    assert not agent.ignored
    assert agent.updates_sent == 1
    assert aggregator.stats.accepted == 1
    assert not aggregator.stats.rejected
    assert [m.version for m in models] == [0, 1]
    final = decode_all(models[1].tensors)
    assert final["temperature"].shape == ()
    np.testing.assert_allclose(final["temperature"], 2.5, rtol=1e-6)
    np.testing.assert_allclose(final["dense0.weight"], 1.5, rtol=1e-6)


# ---------------------------------------------------------------- npz labels lacking the top class


def test_npz_device_without_the_top_classes_trains_a_ten_class_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    data = tmp_path / "local.npz"
    np.savez(data, x=rng.normal(size=(24, 64)).astype(np.float32),
             y=np.arange(24) % 8)  # labels 0..7 only
    trainer = build_trainer(agent_config("mlp", source="npz", path=str(data)))
    weights = init_mlp([64, 16, 10], seed=0)
    result = trainer.fit(weights, TrainConfig(epochs=1, batch_size=8, lr=0.1), 7)
    assert list(result.weights) == list(weights)
    assert {k: v.shape for k, v in result.weights.items()} == {
        k: v.shape for k, v in weights.items()}
    # [data] eval_fraction (0.2 by default) holds 5 of the 24 rows out for evaluation
    assert result.num_examples == 19
    assert trainer.evaluate(result.weights).num_examples == 5
    # softmax regression too, and a model with fewer outputs than the labels need is refused
    softmax = build_trainer(agent_config("softmax", source="npz", path=str(data)))
    assert softmax.fit(init_mlp([64, 10], seed=0), TrainConfig(epochs=1), 1).num_examples == 19
    with pytest.raises(ValueError, match="labels"):
        trainer.fit(init_mlp([64, 16, 5], seed=0), TrainConfig(epochs=1), 1)


# ---------------------------------------------------------------- [trainer] options


OPTIONS_MODULE = '''
class T:
    def __init__(self, hidden, name):
        self.hidden, self.name = hidden, name
    def fit(self, weights, config, round_seed): ...
    def evaluate(self, weights): ...


def make(config, *, hidden, name="plain"):
    return T(hidden, name)
'''


def options_config(kind: str, options: dict[str, Any]) -> AgentConfig:
    return dataclasses.replace(agent_config(kind),
                               trainer=TrainerConfig(kind=kind, options=options))


def test_trainer_options_are_the_factorys_keyword_arguments(workdir: Path) -> None:
    write_module(workdir, "sdk_options", OPTIONS_MODULE)
    try:
        trainer = build_trainer(options_config("sdk_options:make", {"hidden": 32}))
        assert (trainer.hidden, trainer.name) == (32, "plain")  # type: ignore[attr-defined]
        trainer = build_trainer(options_config("sdk_options:make",
                                               {"hidden": 8, "name": "cnn"}))
        assert (trainer.hidden, trainer.name) == (8, "cnn")  # type: ignore[attr-defined]
        # an option the factory does not take, or a missing required one: one ConfigError
        for options, word in (({"hidden": 8, "depth": 2}, "depth"), ({}, "hidden")):
            with pytest.raises(ConfigError) as info:
                build_trainer(options_config("sdk_options:make", options))
            message = str(info.value)
            assert "[trainer] options" in message
            assert word in message
            assert "\n" not in message
    finally:
        sys.modules.pop("sdk_options", None)


@pytest.mark.parametrize("kind", ["mlp", "softmax"])
def test_built_in_trainers_refuse_options(kind: str) -> None:
    with pytest.raises(ConfigError, match=r"\[trainer\] options .*hidden"):
        build_trainer(options_config(kind, {"hidden": 32}))
