"""The device SDK: custom trainers named in ``[trainer]``, checked at start-up (issue 10)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from device_agent.service import AgentService, build_trainer
from device_agent.trainers import MLPTrainer, SoftmaxTrainer, check_trainer
from fedmq.config import AgentConfig, DataConfig, DeviceConfig, TrainerConfig
from fedmq.errors import ConfigError

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
