"""Strict loading of the aggregator and agent TOML files (fedmq/config.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import pytest

from fedmq.config import (
    DEVICE_ID_ENV,
    RULES,
    AgentConfig,
    AggregatorConfig,
    BrokerConfig,
    DataConfig,
    DeviceConfig,
    RobustConfig,
    TrainSettings,
    check_agent,
    check_aggregator,
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
    # The example names no device id: every agent gets its own from the flag or the environment.
    cfg = load_agent(REPO / "examples" / "agent.toml", environ={DEVICE_ID_ENV: "dev-1"})
    assert isinstance(cfg, AgentConfig)
    assert cfg.federation == "digits"
    assert cfg.device_id() == "dev-1"
    assert cfg.data.source == "digits"
    assert cfg.trainer.kind == "mlp"
    with pytest.raises(ConfigError, match="no device id: pass --device-id ID"):
        load_agent(REPO / "examples" / "agent.toml", environ={})


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
    ("text", "pattern"),
    [
        ('federaton = "x"', r"unknown key `federaton`"),
        ("[rounds]\nmin_update = 2", r"unknown key `rounds\.min_update`"),
        ('[broker]\nhostname = "x"', r"unknown key `broker\.hostname`"),
        ("[strategy]\nnesterov = true", r"unknown key `strategy\.nesterov`"),
        ("[federation]\nname = 'x'", r'federation = \{name = "x"\} must be a string'),
    ],
    ids=["top-level", "rounds", "broker", "strategy", "federation-as-table"],
)
def test_unknown_or_misplaced_key_is_named(tmp_path: Path, text: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
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
    with pytest.raises(ConfigError, match=r'\[rounds\] min_updates = "2" must be an integer$'):
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
    with pytest.raises(ConfigError, match='"extend" or "reannounce"'):
        load_aggregator(write(tmp_path, '[rounds]\nbelow_quorum = "retry"'))


def test_literal_fields_accept_each_choice(tmp_path: Path) -> None:
    cfg = load_aggregator(write(tmp_path, '[rounds]\nbelow_quorum = "reannounce"'))
    assert cfg.rounds.below_quorum == "reannounce"
    agent = load_agent(agent_file(
        tmp_path, '[data]\nsource = "npz"\npath = "local.npz"\npartition = "shards"'))
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
    ("lo", "hi", "pattern"),
    [(3, 2, r"\[rounds\] min_updates = 3 must be <= \[rounds\] max_updates = 2$"),
     (0, 5, r"\[rounds\] min_updates = 0 must be an integer in \[1, "),
     (-1, 5, r"\[rounds\] min_updates = -1 must be an integer in \[1, ")],
    ids=["min-above-max", "min-zero", "min-negative"],
)
def test_bad_quorum_bounds(tmp_path: Path, lo: int, hi: int, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
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
    with pytest.raises(ConfigError, match=r"no device id: pass --device-id ID, set "
                                          r"FEDMQ_DEVICE_ID, or set \[device\] id in the file "
                                          r"\(every agent needs its own\)$"):
        load_agent(write(tmp_path, 'federation = "f"\n'), environ={})


@pytest.mark.parametrize(
    ("flag", "env", "device", "expected"),
    [
        ("from-flag", "from-env", 'id = "from-file"', "from-flag"),
        (None, "from-env", 'id = "from-file"', "from-env"),
        (None, "", 'id = "from-file"', "from-file"),  # an empty variable counts as unset
        (None, None, 'id = "from-file"', "from-file"),
        (None, None, f'id_from_env = "{DEVICE_ENV}"', "from-named-env"),
        (None, "from-env", f'id_from_env = "{DEVICE_ENV}"', "from-env"),
        ("from-flag", None, "", "from-flag"),
        (None, "from-env", "", "from-env"),
    ],
    ids=["flag-first", "env-before-file", "empty-env", "file", "named-env", "env-before-named",
         "flag-alone", "env-alone"],
)
def test_device_id_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *,
                              flag: str | None, env: str | None, device: str,
                              expected: str) -> None:
    """--device-id > $FEDMQ_DEVICE_ID > [device] id > [device] id_from_env."""
    monkeypatch.setenv(DEVICE_ENV, "from-named-env")
    environ = {} if env is None else {DEVICE_ID_ENV: env}
    cfg = load_agent(agent_file(tmp_path, device=device), device_id=flag, environ=environ)
    assert cfg.device_id() == expected


def test_device_id_env_defaults_to_the_process_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_ID_ENV, "dev-7")
    assert load_agent(agent_file(tmp_path)).device_id() == "dev-7"


@pytest.mark.parametrize(("flag", "env", "source"),
                         [("a/b", None, "--device-id"), ("", None, "--device-id"),
                          (None, "a b", r"\$FEDMQ_DEVICE_ID")])
def test_bad_device_id_from_flag_or_env(tmp_path: Path, flag: str | None, env: str | None,
                                        source: str) -> None:
    path = agent_file(tmp_path)
    environ = {} if env is None else {DEVICE_ID_ENV: env}
    with pytest.raises(ConfigError, match=rf"^{source}: device id .* must be 1-64 characters"):
        load_agent(path, device_id=flag, environ=environ)


@pytest.mark.parametrize(
    "device_id", ["a/b", "+", "#", "has space", "x" * 65, "dev\u00e9"],
    ids=["slash", "plus", "hash", "space", "too-long", "non-ascii"],
)
def test_bad_device_id(tmp_path: Path, device_id: str) -> None:
    with pytest.raises(ConfigError, match=r"\[device\] id = .* must be 1-64 characters"):
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


# ---------------------------------------------------------------- every key's values
#
# For every key of both files: values of the wrong type, NaN and infinities, zero and negative
# numbers where they mean nothing, and values past the key's range. Each must fail with one
# ConfigError line that names the file and the key.

WRONG_FOR_NUMBER = [("str", '"1"'), ("bool", "true"), ("array", "[1]"), ("table", "{ a = 1 }")]
NON_FINITE = [("nan", "nan"), ("inf", "inf"), ("-inf", "-inf")]
POSITIVE = [*WRONG_FOR_NUMBER, *NON_FINITE, ("zero", "0"), ("zero-float", "0.0"),
            ("negative", "-1"), ("negative-float", "-0.5"), ("huge-int", "1" + "0" * 400)]
NON_NEGATIVE = [*WRONG_FOR_NUMBER, *NON_FINITE, ("negative", "-1"), ("negative-float", "-1e-9")]
SECONDS = [*POSITIVE, ("above-1e9", "1e10")]
SECONDS_OR_ZERO = [*NON_NEGATIVE, ("above-1e9", "1e10")]
UNIT = [*NON_NEGATIVE, ("above-1", "1.5")]  # [0, 1]
QUANTILE = [*UNIT, ("zero", "0"), ("one", "1")]  # (0, 1)
DECAY = [*NON_NEGATIVE, ("one", "1"), ("above-1", "1.5")]  # [0, 1)
WRONG_FOR_INT = [*WRONG_FOR_NUMBER, ("float", "2.0"), ("fraction", "1.5"), ("nan", "nan"),
                 ("inf", "inf"), ("2**63", str(1 << 63)), ("-2**63-1", str(-(1 << 63) - 1))]
INT_NON_NEGATIVE = [*WRONG_FOR_INT, ("negative", "-1"), ("-2**63", str(-(1 << 63)))]
INT_POSITIVE = [*INT_NON_NEGATIVE, ("zero", "0")]
PORT = [*INT_POSITIVE, ("65536", "65536"), ("huge", str((1 << 63) - 1))]
TEXT = [("empty", '""'), ("int", "5"), ("bool", "false"), ("array", '["a"]'),
        ("nul", '"a\\u0000b"')]
ENV_NAME = [*TEXT, ("equals-sign", '"A=B"')]
NAME = [("empty", '""'), ("int", "5"), ("slash", '"a/b"'), ("plus", '"+"'), ("hash", '"f#"'),
        ("space", '"a b"'), ("too-long", '"' + "x" * 65 + '"'), ("non-ascii", '"caf\u00e9"'),
        ("newline", '"a\\nb"')]
BOOL = [("int", "1"), ("str", '"true"'), ("float", "1.0")]
CHOICE = [("unknown", '"nope"'), ("empty", '""'), ("int", "1"), ("bool", "true"),
          ("upper-case", None)]
LAYERS = [("empty", "[]"), ("one-size", "[64]"), ("zero-size", "[64, 0]"),
          ("negative-size", "[64, -3, 10]"), ("str-size", '[64, "10"]'),
          ("float-size", "[64, 10.0]"), ("not-a-list", "64"),
          ("too-large-tensor", "[65536, 65537]")]
CHOICES = {
    ("rounds", "below_quorum"): "extend", ("limits", "weight_mode"): "cap",
    ("robust", "mode"): "clip", ("strategy", "name"): "fedavg", ("compression", "codec"): "fp32",
    ("compression", "values"): "int8", ("data", "source"): "digits", ("data", "partition"): "iid",
    ("task", "kind"): "train", ("rounds", "mode"): "sync", ("rounds", "staleness_weight"): "sqrt",
    ("cluster", "role"): "single",
}
COLUMNS = [("not-a-list", '"a"'), ("duplicate", '["a", "a"]'), ("empty-name", '[""]'),
           ("number", "[1]"), ("too-many", "[" + ", ".join(f'"c{i}"' for i in range(257)) + "]")]

AGGREGATOR_KEYS: dict[tuple[str, str], Sequence[tuple[str, str | None]]] = {
    ("", "federation"): NAME,
    ("broker", "host"): TEXT,
    ("broker", "port"): PORT,
    ("broker", "mqtt5"): BOOL,
    ("broker", "username"): [("int", "5"), ("bool", "true")],
    ("broker", "password"): [("int", "5"), ("array", "[]")],
    ("broker", "tls"): BOOL,
    ("broker", "ca_file"): TEXT,
    ("broker", "cert_file"): TEXT,
    ("broker", "key_file"): TEXT,
    ("broker", "keepalive"): PORT,
    ("broker", "client_id"): TEXT,
    ("broker", "reconnect_min_s"): SECONDS,
    ("broker", "reconnect_max_s"): SECONDS,
    ("broker", "failover"): [("not-a-list", '"h:1883"'), ("no-port", '["host"]'),
                             ("port-0", '["h:0"]'), ("no-host", '[":1883"]'),
                             ("duplicate", '["h:1", "h:1"]'), ("number", "[1883]")],
    ("model", "layers"): LAYERS,
    ("model", "seed"): INT_NON_NEGATIVE,
    ("model", "path"): TEXT,
    ("rounds", "min_updates"): INT_POSITIVE,
    ("rounds", "max_updates"): INT_POSITIVE,
    ("rounds", "deadline_s"): SECONDS,
    ("rounds", "grace_s"): SECONDS_OR_ZERO,
    ("rounds", "below_quorum"): CHOICE,
    ("rounds", "max_extensions"): INT_NON_NEGATIVE,
    ("rounds", "max_rounds"): INT_NON_NEGATIVE,
    ("rounds", "idle_warn_s"): SECONDS,
    ("rounds", "mode"): CHOICE,
    ("rounds", "buffer_size"): [*INT_POSITIVE, ("above-1e6", "1000001")],
    ("rounds", "max_staleness"): [*INT_NON_NEGATIVE, ("above-1e6", "1000001")],
    ("rounds", "staleness_weight"): CHOICE,
    ("rounds", "staleness_exponent"): [*NON_NEGATIVE, ("above-10", "10.5")],
    ("train", "epochs"): [*INT_POSITIVE, ("1001", "1001")],
    ("train", "batch_size"): [*INT_POSITIVE, ("2**20+1", str((1 << 20) + 1))],
    ("train", "lr"): [*POSITIVE, ("above-100", "100.5")],
    ("train", "proximal_mu"): [*NON_NEGATIVE, ("above-1000", "1000.5")],
    ("train", "seed"): INT_NON_NEGATIVE,
    ("sampling", "rate"): UNIT,
    ("sampling", "seed"): INT_NON_NEGATIVE,
    ("limits", "max_update_bytes"): INT_POSITIVE,
    ("limits", "max_examples"): INT_POSITIVE,
    ("limits", "weight_mode"): CHOICE,
    ("limits", "reject_log_every_s"): SECONDS,
    ("strategy", "name"): CHOICE,
    ("strategy", "server_lr"): POSITIVE,
    ("strategy", "momentum"): DECAY,
    ("strategy", "beta1"): DECAY,
    ("strategy", "beta2"): DECAY,
    ("strategy", "tau"): POSITIVE,
    ("strategy", "fold_threads"): [*INT_NON_NEGATIVE, ("1025", "1025")],
    ("robust", "mode"): CHOICE,
    ("robust", "clip_norm"): POSITIVE,
    ("robust", "clip_multiplier"): POSITIVE,
    ("robust", "max_norm"): POSITIVE,
    ("robust", "initial_norm"): POSITIVE,
    ("robust", "target_quantile"): QUANTILE,
    ("robust", "adapt_rate"): [*POSITIVE, ("above-10", "10.5")],
    ("robust", "max_change_norm"): POSITIVE,
    ("compression", "codec"): CHOICE,
    ("compression", "block"): [*INT_POSITIVE, ("2**24+1", str((1 << 24) + 1))],
    ("compression", "fraction"): [*POSITIVE, ("above-1", "1.5")],
    ("compression", "values"): CHOICE,
    ("compression", "max_chunk_bytes"): [*INT_POSITIVE, ("4095", "4095")],
    ("durability", "state_dir"): TEXT,
    ("durability", "session_expiry_s"): [*INT_NON_NEGATIVE, ("2**32", str(1 << 32))],
    ("durability", "history_keep"): INT_POSITIVE,
    ("durability", "snapshot_every_updates"): INT_NON_NEGATIVE,
    ("durability", "snapshot_every_s"): SECONDS_OR_ZERO,
    ("metrics", "listen"): [("no-port", '"0.0.0.0"'), ("port-0", '"host:0"'),
                            ("port-65536", '"host:65536"'), ("port-word", '"host:http"'),
                            ("int", "9464"), ("bool", "true")],
    ("task", "kind"): CHOICE,
    ("task", "columns"): COLUMNS,
    ("task", "bins"): [("two", "[0, 1]"), ("lo-above-hi", "[1, 0, 4]"), ("no-bins", "[0, 1, 0]"),
                       ("fractional-bins", "[0, 1, 2.5]"), ("nan", "[0, nan, 3]"),
                       ("too-many-bins", "[0, 1, 65537]"), ("not-a-list", "3")],
    ("task", "edges"): [("one", "[0]"), ("unsorted", "[0, 2, 1]"), ("equal", "[0, 1, 1]"),
                        ("inf", "[0, inf]"), ("not-a-list", "1")],
    ("task", "column_bins"): [("not-a-table", "[1]"), ("bad-bins", "{ a = [1, 0, 3] }"),
                              ("text", '{ a = "0:1:3" }')],
    ("privacy", "noise_multiplier"): [*NON_NEGATIVE, ("above-1e6", "1e7")],
    ("privacy", "clip_norm"): POSITIVE,
    ("privacy", "target_epsilon"): [*POSITIVE, ("above-1e6", "1e7")],
    ("privacy", "delta"): [*QUANTILE],
    ("privacy", "secure_aggregation"): BOOL,
    ("security", "signing_key"): [*TEXT, ("missing-file", '"/nonexistent/signing_key.pem"')],
    ("cluster", "role"): CHOICE,
    ("cluster", "name"): [n for n in NAME if n[0] != "empty"],  # empty: no name (single)
    ("cluster", "workers"): [("not-a-list", '"w0"'), ("duplicate", '["a", "a"]'),
                             ("bad-name", '["a/b"]'), ("number", "[1]"), ("empty-name", '[""]')],
    ("cluster", "shards"): [*INT_NON_NEGATIVE, ("65537", "65537")],
    ("cluster", "shard"): [*INT_NON_NEGATIVE, ("65536", "65536")],
    ("cluster", "upstream"): [("no-port", '"host"'), ("port-0", '"host:0"'), ("int", "1883")],
    ("cluster", "progress_interval_s"): SECONDS,
}

AGENT_KEYS: dict[tuple[str, str], Sequence[tuple[str, str | None]]] = {
    ("", "federation"): NAME,
    ("broker", "host"): TEXT,
    ("broker", "port"): PORT,
    ("broker", "keepalive"): PORT,
    ("broker", "client_id"): TEXT,
    ("broker", "reconnect_min_s"): SECONDS,
    ("broker", "reconnect_max_s"): SECONDS,
    ("broker", "failover"): [("not-a-list", '"h:1883"'), ("no-port", '["host"]'),
                             ("port-0", '["h:0"]'), ("no-host", '[":1883"]'),
                             ("duplicate", '["h:1", "h:1"]'), ("number", "[1883]")],
    ("device", "id"): NAME,
    ("device", "id_from_env"): ENV_NAME,
    ("device", "state_dir"): TEXT,
    ("device", "outbox_max_bytes"): INT_POSITIVE,
    ("device", "outbox_max_messages"): INT_POSITIVE,
    ("device", "min_interval_s"): SECONDS_OR_ZERO,
    ("device", "subscribe_qos"): [*INT_NON_NEGATIVE, ("two", "2")],
    ("data", "source"): CHOICE,
    ("data", "path"): TEXT,
    ("data", "partition"): CHOICE,
    ("data", "num_shards"): INT_POSITIVE,
    ("data", "shard"): INT_NON_NEGATIVE,
    ("data", "shard_from_env"): ENV_NAME,
    ("data", "seed"): [*INT_NON_NEGATIVE, ("2**32", str(1 << 32))],
    ("data", "eval_fraction"): UNIT,
    ("trainer", "kind"): TEXT,
    ("trainer", "options"): [("integer", "3"), ("string", '"hidden=32"'), ("list", "[1, 2]")],
    ("security", "trusted_keys"): [
        ("not-a-list", '"BcMQ5aAvh6vArr0FFAV5qPSO0l8MquvHinSNt7UDtjA="'), ("number", "[1]"),
        ("not-base64", '["not a key"]'), ("short", '["BcMQ5aAvh6vArr0F"]'),
        ("duplicate", '["BcMQ5aAvh6vArr0FFAV5qPSO0l8MquvHinSNt7UDtjA=", '
                      '"BcMQ5aAvh6vArr0FFAV5qPSO0l8MquvHinSNt7UDtjA="]')],
    ("task", "kind"): CHOICE,
    ("task", "columns"): COLUMNS,
    ("task", "statistics"): [("no-colon", '"pkg.mod"'), ("empty", '""'), ("int", "5"),
                             ("space", '"pkg mod:f"')],
}


def _label(section: str, key: str) -> str:
    """How messages name a key: ``[section] key``, or the bare key at the top level."""
    return f"[{section}] {key}" if section else key


def _toml(section: str, key: str, value: str, agent: bool) -> str:
    line = f"{key} = {value}"
    if not agent:
        return f"[{section}]\n{line}\n" if section else f"{line}\n"
    if section == "device":
        return f"[device]\n{line}\n" if key == "id" else f'[device]\nid = "dev-1"\n{line}\n'
    head = f"{line}\n" if not section else ""
    body = f"[{section}]\n{line}\n" if section else ""
    return f'{head}[device]\nid = "dev-1"\n{body}'


def _invalid_cases() -> list[Any]:
    cases = []
    for agent, table in ((False, AGGREGATOR_KEYS), (True, AGENT_KEYS)):
        for (section, key), values in table.items():
            for name, value in values:
                text = value
                if text is None:  # a choice in the wrong case
                    text = f'"{CHOICES[section, key].upper()}"'
                dotted = f"{section}.{key}" if section else key
                cases.append(pytest.param(
                    agent, section, key, _toml(section, key, text, agent),
                    id=f"{'agent' if agent else 'aggregator'}:{dotted}={name}"))
    return cases


@pytest.mark.parametrize(("agent", "section", "key", "text"), _invalid_cases())
def test_invalid_value_is_one_line_naming_file_and_key(
    tmp_path: Path, agent: bool, section: str, key: str, text: str
) -> None:
    path = write(tmp_path, text, "agent.toml" if agent else "aggregator.toml")
    with pytest.raises(ConfigError) as info:
        (load_agent if agent else load_aggregator)(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert "\r" not in message, message
    assert message.startswith(f"{path}: "), message
    assert f"{_label(section, key)} = " in message, message
    assert " must be " in message, message


def _keys_of(cls: type[Any], section: str = "") -> set[tuple[str, str]]:
    keys: set[tuple[str, str]] = set()
    for f in dataclasses.fields(cls):
        if f.metadata.get("rest"):  # not a key: the section's other keys ([train] extras)
            continue
        tp = get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys |= _keys_of(tp, f.name)  # type: ignore[arg-type]
        else:
            keys.add((section, f.name))
    return keys


def test_the_table_covers_every_key() -> None:
    assert _keys_of(AggregatorConfig) == set(AGGREGATOR_KEYS)
    agent_keys = _keys_of(AgentConfig)
    assert set(AGENT_KEYS) <= agent_keys
    # The broker section is AggregatorConfig's too: its remaining keys are covered there.
    assert {k for k in agent_keys - set(AGENT_KEYS) if k[0] != "broker"} == set()


def test_every_numeric_key_has_a_range_rule() -> None:
    def numeric(tp: Any) -> bool:
        args = get_args(tp) or (tp,)
        return any(a in (int, float) or get_origin(a) is list for a in args)

    missing = []
    for config in (AggregatorConfig(), AgentConfig()):
        for section in dataclasses.fields(config):
            cls = type(getattr(config, section.name))
            if not dataclasses.is_dataclass(cls):
                continue
            hints = get_type_hints(cls)
            missing += [f"{section.name}.{f.name}" for f in dataclasses.fields(cls)
                        if numeric(hints[f.name]) and f.name not in RULES.get(cls, {})]
    assert missing == []


# ---------------------------------------------------------------- edges that are fine

EDGES = [
    "[broker]\nport = 1\nkeepalive = 65535\nreconnect_min_s = 1e9\nreconnect_max_s = 1e9",
    "[broker]\nport = 65535\nkeepalive = 1\nreconnect_min_s = 1e-6",
    f"[model]\nlayers = [1, 1]\nseed = {(1 << 63) - 1}",
    "[model]\nlayers = [32768, 65536, 1]",  # 2**31 weights: the largest tensor allowed
    "[rounds]\nmin_updates = 5\nmax_updates = 5\ngrace_s = 0\ndeadline_s = 1e9"
    "\nidle_warn_s = 0.001",
    "[train]\nepochs = 1000\nbatch_size = 1048576\nlr = 100",
    "[train]\nepochs = 1\nbatch_size = 1\nlr = 1e-9",
    f"[sampling]\nrate = 0\nseed = {(1 << 63) - 1}",
    "[sampling]\nrate = 1.0",
    "[strategy]\nfold_threads = 1024\nserver_lr = 1e6",
    '[strategy]\nname = "fedavgm"\nmomentum = 0\nserver_lr = 1e-9',
    '[strategy]\nname = "fedavgm"\nmomentum = 0.999999',
    '[strategy]\nname = "fedadam"\nbeta1 = 0\nbeta2 = 0.999999\ntau = 1e-12',
    '[strategy]\nname = "fedyogi"\nbeta1 = 0.999999\nbeta2 = 0\ntau = 1e6',
    '[strategy]\nname = "fedadagrad"\nbeta1 = 0\ntau = 1e-9\nserver_lr = 10',
    "[robust]\nclip_norm = 100\nmax_norm = 100\ninitial_norm = 1e-9\ntarget_quantile = 0.999"
    "\nadapt_rate = 10\nmode = \"reject\"",
    "[robust]\ntarget_quantile = 1e-6\nadapt_rate = 1e-9\nmode = \"off\"",
    "[compression]\nblock = 16777216\nfraction = 1\nmax_chunk_bytes = 4096",
    "[compression]\nblock = 1\nmax_chunk_bytes = 67108864",
    f"[durability]\nsession_expiry_s = {(1 << 32) - 1}\nsnapshot_every_updates = 0"
    "\nsnapshot_every_s = 0",
    "[durability]\nsession_expiry_s = 0\nhistory_keep = 1",
    '[limits]\nmax_update_bytes = 4096\nmax_examples = 1\nweight_mode = "reject"'
    "\nreject_log_every_s = 0.5\n[compression]\nmax_chunk_bytes = 4096",
]


@pytest.mark.parametrize("text", EDGES, ids=[f"edge-{i}" for i in range(len(EDGES))])
def test_values_at_the_edges_of_their_ranges_load(tmp_path: Path, text: str) -> None:
    load_aggregator(write(tmp_path, text))


def test_agent_values_at_the_edges_load(tmp_path: Path) -> None:
    cfg = load_agent(agent_file(
        tmp_path, f"[data]\nnum_shards = 3\nshard = 2\nseed = {(1 << 32) - 1}",
        device='id = "d"\noutbox_max_bytes = 1\noutbox_max_messages = 1'))
    assert (cfg.data.shard, cfg.device.outbox_max_bytes) == (2, 1)


def test_integers_are_read_as_floats_for_optional_float_keys(tmp_path: Path) -> None:
    cfg = load_aggregator(write(tmp_path, "[robust]\nclip_norm = 5\ninitial_norm = 2"))
    assert (cfg.robust.clip_norm, cfg.robust.initial_norm) == (5.0, 2.0)
    assert type(cfg.robust.clip_norm) is float
    assert type(cfg.robust.initial_norm) is float


def test_the_examples_message(tmp_path: Path) -> None:
    path = write(tmp_path, "[train]\nlr = nan\n", "aggregator.toml")
    with pytest.raises(ConfigError) as info:
        load_aggregator(path)
    assert str(info.value) == f"{path}: [train] lr = nan must be a finite number in (0, 100]"


def test_train_bounds_are_the_devices(tmp_path: Path) -> None:
    """An announcement the config allows is one every device accepts, and the other way round."""
    from device_agent import trainers
    from fedmq import models

    cfg = load_aggregator(write(
        tmp_path, f"[train]\nepochs = {models.MAX_EPOCHS}\nbatch_size = "
                  f"{models.MAX_BATCH_SIZE}\nlr = {models.MAX_LR}"))
    trainers.TrainConfig(epochs=cfg.train.epochs, batch_size=cfg.train.batch_size,
                         lr=cfg.train.lr)


# ---------------------------------------------------------------- values that do not fit together


@pytest.mark.parametrize(
    ("text", "agent", "pattern"),
    [
        ("[broker]\nreconnect_min_s = 5\nreconnect_max_s = 1", False,
         r"\[broker\] reconnect_min_s = 5.0 must be <= \[broker\] reconnect_max_s = 1.0$"),
        ("[broker]\nreconnect_min_s = 60", True,
         r"\[broker\] reconnect_min_s = 60.0 must be <= \[broker\] reconnect_max_s = 30.0$"),
        ("[robust]\nclip_norm = 200\nmax_norm = 100", False,
         r"\[robust\] clip_norm = 200.0 must be <= \[robust\] max_norm = 100.0$"),
        ("[robust]\nclip_norm = 5\nmax_norm = 4.5", False,
         r"\[robust\] clip_norm = 5.0 must be <= \[robust\] max_norm = 4.5$"),
        ("[limits]\nmax_update_bytes = 100000", False,
         r"\[compression\] max_chunk_bytes = 262144 must be <= \[limits\] max_update_bytes = "
         r"100000$"),
        ('[rounds]\nbelow_quorum = "reannounce"\nmax_extensions = 2', False,
         r'\[rounds\] max_extensions = 2 only applies with \[rounds\] below_quorum = "extend"'),
        ("[data]\nnum_shards = 3\nshard = 3", True,
         r"\[data\] shard = 3 must be < \[data\] num_shards = 3$"),
        ('[data]\nsource = "npz"', True, r'\[data\] source = "npz" needs \[data\] path$'),
        ("[strategy]\nmomentum = 0.5", False,
         r'\[strategy\] momentum = 0.5 only applies with \[strategy\] name = "fedavgm" '
         r'\(it is "fedavg"\)$'),
        ('[strategy]\nname = "fedavgm"\nbeta1 = 0.8', False,
         r'\[strategy\] beta1 = 0.8 only applies with \[strategy\] name = "fedadam", '
         r'"fedyogi" or "fedadagrad" \(it is "fedavgm"\)$'),
        ('[strategy]\nname = "fedadagrad"\nbeta2 = 0.9', False,
         r'\[strategy\] beta2 = 0.9 only applies with \[strategy\] name = "fedadam" or '
         r'"fedyogi" \(it is "fedadagrad"\)$'),
    ],
    ids=["reconnect-min-above-max", "agent-reconnect-min-above-default-max",
         "clip-above-max-norm", "clip-above-smaller-max-norm", "chunk-above-update-limit",
         "extensions-with-reannounce", "shard-not-below-num-shards", "npz-without-path",
         "momentum-without-fedavgm", "beta1-with-fedavgm", "beta2-with-fedadagrad"],
)
def test_values_that_do_not_fit_together(
    tmp_path: Path, text: str, agent: bool, pattern: str
) -> None:
    path = agent_file(tmp_path, text) if agent else write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: {pattern}"):
        (load_agent if agent else load_aggregator)(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {"server_lr": 1.0}),
        ("server_lr = 0.5", {"server_lr": 0.5}),
        ('name = "fedavgm"', {"server_lr": 1.0, "momentum": 0.9}),
        ('name = "fedadam"\ntau = 1e-4',
         {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-4}),
        ('name = "fedyogi"\nserver_lr = 0.03\nbeta2 = 0.9',
         {"server_lr": 0.03, "beta1": 0.9, "beta2": 0.9, "tau": 1e-3}),
        ('name = "fedadagrad"\nbeta1 = 0', {"server_lr": 0.1, "beta1": 0.0, "tau": 1e-3}),
    ],
    ids=["fedavg", "fedavg-lr", "fedavgm", "fedadam-tau", "fedyogi-lr-beta2", "fedadagrad"],
)
def test_strategy_settings_are_the_defaults_replaced_by_the_keys_set(
        tmp_path: Path, text: str, expected: dict[str, float]) -> None:
    settings = load_aggregator(write(tmp_path, f"[strategy]\n{text}")).strategy.settings()
    assert settings == expected
    assert all(type(v) is float for v in settings.values())


def test_device_id_problems_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    path = agent_file(tmp_path, device=f'id_from_env = "{DEVICE_ENV}"')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: \[device\] id_from_env = "
                                          rf'"{DEVICE_ENV}" but \${DEVICE_ENV} is unset'):
        load_agent(path, environ={})


def test_check_aggregator_applies_the_rules_to_configs_built_in_code() -> None:
    check_aggregator(AggregatorConfig())
    with pytest.raises(ConfigError, match=r"^config: \[train\] lr = nan must be"):
        check_aggregator(AggregatorConfig(train=TrainSettings(lr=math.nan)))
    with pytest.raises(ConfigError, match=r"^here: \[robust\] target_quantile = 1.0 must be"):
        check_aggregator(AggregatorConfig(robust=RobustConfig(target_quantile=1.0)), "here")
    with pytest.raises(ConfigError, match=r'^config: \[broker\] port = "x" must be'):
        check_aggregator(AggregatorConfig(broker=BrokerConfig(port="x")))  # type: ignore[arg-type]


def test_check_agent_applies_the_rules_to_configs_built_in_code() -> None:
    check_agent(AgentConfig(device=DeviceConfig(id="d")))
    with pytest.raises(ConfigError, match=r"^config: \[data\] seed = -1 must be"):
        check_agent(AgentConfig(device=DeviceConfig(id="d"), data=DataConfig(seed=-1)))


# ---------------------------------------------------------------- unreadable files


@pytest.mark.parametrize(
    ("content", "pattern"),
    [(b"\xff\xfe[rounds]", "is not valid TOML: not UTF-8"),
     (b"a = " + b"9" * 5000, "is not valid TOML"),
     (b'"a\\nb" = 2\n', r"unknown key `a b`")],
    ids=["not-utf8", "5000-digit-integer", "newline-in-key"],
)
def test_unreadable_content_is_one_line(tmp_path: Path, content: bytes, pattern: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    for load in (load_aggregator, load_agent):
        with pytest.raises(ConfigError, match=pattern) as info:
            load(path)
        assert "\n" not in str(info.value)
        assert str(path) in str(info.value)


def test_trainer_options_table_loads_as_written(tmp_path: Path) -> None:
    cfg = load_agent(agent_file(
        tmp_path, '[trainer]\nkind = "my.mod:make"\n[trainer.options]\nhidden = 32\n'
                  'name = "cnn"\nsizes = [1, 2]\nnested = {a = 1.5}'))
    assert cfg.trainer.options == {"hidden": 32, "name": "cnn", "sizes": [1, 2],
                                   "nested": {"a": 1.5}}
    assert load_agent(agent_file(tmp_path)).trainer.options == {}


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(tmp_path))} cannot be "
                                          "read"):
        load_aggregator(tmp_path)


def test_every_key_is_documented() -> None:
    rows = [line for line in (REPO / "docs" / "configuration.md").read_text().splitlines()
            if line.startswith("| `")]
    missing = []
    for section, key in sorted(set(AGGREGATOR_KEYS) | set(AGENT_KEYS)):
        head = f"`[{section}] " if section else "`"
        if not any(row.startswith(f"| {head}") and (f"{head}{key}`" in row or f"`{key}`" in row)
                   for row in rows):
            missing.append(_label(section, key))
    assert missing == []
