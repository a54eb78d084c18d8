"""Strict loading of the aggregator and agent TOML files (fedmq/config.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fedmq.config import (
    AgentConfig,
    AggregatorConfig,
    DeviceConfig,
    load_agent,
    load_aggregator,
)
from fedmq.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

# Named so that no real environment sets it by accident.
DEVICE_ENV = "FEDMQ_TEST_CONFIG_DEVICE_ID"


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def agent_file(tmp_path: Path, extra: str = "", device: str = 'id = "dev-1"') -> Path:
    return write(tmp_path, f"{extra}\n[device]\n{device}\n", "agent.toml")


# ---------------------------------------------------------------- shipped files


def test_example_aggregator_loads() -> None:
    cfg = load_aggregator(REPO / "examples" / "aggregator.toml")
    assert isinstance(cfg, AggregatorConfig)
    assert cfg.federation == "digits"
    layers = cfg.model.layers
    assert (layers[0], layers[-1]) == (64, 10)  # 8x8 digits in, 10 classes out
    assert (cfg.rounds.min_updates, cfg.rounds.max_updates) == (2, 20)
    # Written as the TOML integer 120, read as a float.
    assert cfg.rounds.deadline_s == 120.0
    assert isinstance(cfg.rounds.deadline_s, float)
    assert cfg.rounds.below_quorum == "extend"


def test_example_agent_loads() -> None:
    cfg = load_agent(REPO / "examples" / "agent.toml")
    assert isinstance(cfg, AgentConfig)
    assert cfg.federation == "digits"
    assert cfg.device_id() == "sensor-001"
    assert cfg.data.source == "digits"
    assert cfg.trainer.kind == "mlp"


def test_docker_aggregator_loads() -> None:
    cfg = load_aggregator(REPO / "docker" / "aggregator.toml")
    assert cfg.federation == "demo"
    assert cfg.broker.host == "broker"  # the compose service name
    assert cfg.rounds.min_updates <= cfg.rounds.max_updates


def test_docker_agent_loads_with_hostname_as_device_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTNAME", "3f2a9c0d1e7b")  # what Docker sets: the container id
    cfg = load_agent(REPO / "docker" / "agent.toml")
    assert cfg.federation == "demo"
    assert cfg.broker.host == "broker"
    assert cfg.device_id() == "3f2a9c0d1e7b"


# ---------------------------------------------------------------- defaults


def test_empty_files_give_the_defaults(tmp_path: Path) -> None:
    assert load_aggregator(write(tmp_path, "")) == AggregatorConfig()
    cfg = load_agent(agent_file(tmp_path))
    assert cfg == AgentConfig(device=DeviceConfig(id="dev-1"))


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("text", "dotted"),
    [
        ('federaton = "x"', "federaton"),
        ("[rounds]\nmin_update = 2", "rounds.min_update"),
        ('[broker]\nhostname = "x"', "broker.hostname"),
        ("[strategy]\nmomentum = 0.9", "strategy.momentum"),
        ("[federation]\nname = 'x'", "federation"),
    ],
    ids=["top-level", "rounds", "broker", "strategy", "federation-as-table"],
)
def test_unknown_or_misplaced_key_is_named(tmp_path: Path, text: str, dotted: str) -> None:
    with pytest.raises(ConfigError, match=rf"`{dotted}`"):
        load_aggregator(write(tmp_path, text))


def test_unknown_agent_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key `data\.shards`"):
        load_agent(agent_file(tmp_path, "[data]\nshards = 3"))


def test_unknown_key_message_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"known: .*max_updates.*min_updates"):
        load_aggregator(write(tmp_path, "[rounds]\nmin_update = 2"))


def test_scalar_where_a_table_belongs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`broker` must be a table"):
        load_aggregator(write(tmp_path, "broker = 5"))


# ---------------------------------------------------------------- types


@pytest.mark.parametrize(
    "text",
    [
        '[rounds]\nmin_updates = "2"',
        "[rounds]\nmin_updates = true",
        "[rounds]\nmin_updates = 2.0",
        "[broker]\nport = 1883.5",
        '[broker]\nport = "1883"',
        "[broker]\nmqtt5 = 1",
        '[broker]\nmqtt5 = "yes"',
        "[rounds]\ndeadline_s = true",
        '[rounds]\ndeadline_s = "60"',
        "[broker]\nhost = 127",
        '[model]\nlayers = [64, "10"]',
        "[model]\nlayers = [64, true]",
        "[model]\nlayers = 64",
        "federation = 3",
    ],
    ids=[
        "str-for-int", "bool-for-int", "float-for-int", "fractional-float-for-int",
        "str-for-port", "int-for-bool", "str-for-bool", "bool-for-float", "str-for-float",
        "int-for-str", "str-in-int-list", "bool-in-int-list", "int-for-list", "int-federation",
    ],
)
def test_wrong_type_is_rejected(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="must be"):
        load_aggregator(write(tmp_path, text))


def test_wrong_type_message_names_key_and_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`rounds\.min_updates` = '2' must be int"):
        load_aggregator(write(tmp_path, '[rounds]\nmin_updates = "2"'))


def test_integers_are_accepted_for_floats(tmp_path: Path) -> None:
    cfg = load_aggregator(write(
        tmp_path, "[rounds]\ndeadline_s = 30\ngrace_s = 0\n[train]\nlr = 1\n"
                  "[sampling]\nrate = 1\n[strategy]\nserver_lr = 2\n"
                  "[broker]\nreconnect_min_s = 1\n"))
    values = (cfg.rounds.deadline_s, cfg.rounds.grace_s, cfg.train.lr, cfg.sampling.rate,
              cfg.strategy.server_lr, cfg.broker.reconnect_min_s)
    assert values == (30.0, 0.0, 1.0, 1.0, 2.0, 1.0)
    assert all(type(v) is float for v in values)


def test_floats_are_kept_as_written(tmp_path: Path) -> None:
    cfg = load_aggregator(write(tmp_path, "[train]\nlr = 0.05\n[sampling]\nrate = 0.25\n"))
    assert (cfg.train.lr, cfg.sampling.rate) == (0.05, 0.25)


@pytest.mark.parametrize(
    "text",
    ['[rounds]\nbelow_quorum = "retry"', '[rounds]\nbelow_quorum = "Extend"',
     '[strategy]\nname = "fedprox"', "[rounds]\nbelow_quorum = 1"],
    ids=["unknown-policy", "wrong-case", "unknown-strategy", "int"],
)
def test_literal_fields_reject_other_values(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="must be"):
        load_aggregator(write(tmp_path, text))


def test_literal_message_lists_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'extend' or 'reannounce'"):
        load_aggregator(write(tmp_path, '[rounds]\nbelow_quorum = "retry"'))


def test_literal_fields_accept_each_choice(tmp_path: Path) -> None:
    cfg = load_aggregator(write(tmp_path, '[rounds]\nbelow_quorum = "reannounce"'))
    assert cfg.rounds.below_quorum == "reannounce"
    agent = load_agent(agent_file(tmp_path, '[data]\nsource = "npz"\npartition = "shards"'))
    assert (agent.data.source, agent.data.partition) == ("npz", "shards")


@pytest.mark.parametrize(
    "text", ['[data]\nsource = "csv"', '[data]\npartition = "dirichlet"'],
    ids=["source", "partition"],
)
def test_agent_literal_fields_reject_other_values(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="must be"):
        load_agent(agent_file(tmp_path, text))


# ---------------------------------------------------------------- cross-field checks


@pytest.mark.parametrize(
    ("lo", "hi"), [(3, 2), (0, 5), (-1, 5)], ids=["min-above-max", "min-zero", "min-negative"]
)
def test_bad_quorum_bounds(tmp_path: Path, lo: int, hi: int) -> None:
    with pytest.raises(ConfigError, match=r"min_updates <= rounds\.max_updates"):
        load_aggregator(write(tmp_path, f"[rounds]\nmin_updates = {lo}\nmax_updates = {hi}"))


def test_min_equal_to_max_is_fine(tmp_path: Path) -> None:
    cfg = load_aggregator(write(tmp_path, "[rounds]\nmin_updates = 3\nmax_updates = 3"))
    assert (cfg.rounds.min_updates, cfg.rounds.max_updates) == (3, 3)


# ---------------------------------------------------------------- names


def test_device_id_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_ENV, "gateway-7")
    cfg = load_agent(agent_file(tmp_path, device=f'id_from_env = "{DEVICE_ENV}"'))
    assert cfg.device_id() == "gateway-7"


def test_explicit_device_id_wins_over_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DEVICE_ENV, "from-env")
    cfg = load_agent(agent_file(tmp_path, device=f'id = "explicit"\nid_from_env = "{DEVICE_ENV}"'))
    assert cfg.device_id() == "explicit"


@pytest.mark.parametrize("value", [None, ""], ids=["unset", "empty"])
def test_device_id_env_var_unset_or_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv(DEVICE_ENV, raising=False)
    else:
        monkeypatch.setenv(DEVICE_ENV, value)
    with pytest.raises(ConfigError, match="id_from_env"):
        load_agent(agent_file(tmp_path, device=f'id_from_env = "{DEVICE_ENV}"'))


def test_device_section_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[device\] needs `id`"):
        load_agent(write(tmp_path, 'federation = "f"\n'))


@pytest.mark.parametrize(
    "device_id", ["a/b", "+", "#", "has space", "x" * 65, "dev\u00e9"],
    ids=["slash", "plus", "hash", "space", "too-long", "non-ascii"],
)
def test_bad_device_id(tmp_path: Path, device_id: str) -> None:
    with pytest.raises(ConfigError, match="device id"):
        load_agent(agent_file(tmp_path, device=f'id = "{device_id}"'))


def test_bad_device_id_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_ENV, "room/3")
    with pytest.raises(ConfigError, match="device id 'room/3'"):
        load_agent(agent_file(tmp_path, device=f'id_from_env = "{DEVICE_ENV}"'))


@pytest.mark.parametrize(
    "name", ["a/b", "", "+", "fed#", "x" * 65, "two words"],
    ids=["slash", "empty", "plus", "hash", "too-long", "space"],
)
def test_bad_federation_name(tmp_path: Path, name: str) -> None:
    text = f'federation = "{name}"\n'
    with pytest.raises(ConfigError, match="federation"):
        load_aggregator(write(tmp_path, text))
    with pytest.raises(ConfigError, match="federation"):
        load_agent(agent_file(tmp_path, text))


SHARD_ENV = "FEDMQ_TEST_CONFIG_SHARD"


def shard_config(tmp_path: Path, device_id: str, num_shards: int = 5) -> AgentConfig:
    return load_agent(agent_file(
        tmp_path, f'[data]\nshard = 1\nnum_shards = {num_shards}\nshard_from_env = "{SHARD_ENV}"',
        device=f'id = "{device_id}"'))


def test_shard_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SHARD_ENV, "2")
    cfg = shard_config(tmp_path, "dev-1")
    assert cfg.shard() == 2
    monkeypatch.setenv(SHARD_ENV, "two")
    with pytest.raises(ConfigError, match="not an integer"):
        cfg.shard()


def test_shard_without_its_variable_comes_from_the_device_id_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SHARD_ENV, raising=False)
    shards = {}
    for i in range(40):
        device_id = f"replica-{i}"
        digest = hashlib.sha256(device_id.encode()).digest()
        expected = int.from_bytes(digest[:8], "big") % 5
        cfg = shard_config(tmp_path, device_id)
        assert cfg.shard() == expected
        assert cfg.shard() == expected  # stable
        shards[device_id] = expected
    assert set(shards.values()) == set(range(5))  # replicas spread over every shard


def test_shard_without_environment_variable_uses_shard(tmp_path: Path) -> None:
    cfg = load_agent(agent_file(tmp_path, "[data]\nshard = 3\nnum_shards = 4"))
    assert cfg.shard() == 3


# ---------------------------------------------------------------- files


@pytest.mark.parametrize(
    "text", ["[rounds\nmin_updates = 2", "federation = ", "a = 1\na = 2", "x = 'unterminated"],
    ids=["bad-header", "no-value", "duplicate-key", "unterminated-string"],
)
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_aggregator(path)
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_agent(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_aggregator(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_agent(str(path))
