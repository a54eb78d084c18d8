"""The device SDK: custom trainers named in ``[trainer]``, checked at start-up (issue 10)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from device_agent.service import AgentService, build_trainer
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
