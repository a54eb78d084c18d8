"""Configuration files (TOML) for the aggregator and the device agent.

Every section is a frozen dataclass; a file is read strictly: an unknown key is an error (a typo
would otherwise be silently ignored on a device nobody can log in to), every value's type is
checked, and so is its range (``RULES``: no NaN or infinity, no zero or negative value where it
means nothing, ports and quantiles and rates within their bounds). Every failure is one
``ConfigError`` line naming the file and the key, e.g.
``aggregator.toml: [train] lr = nan must be a finite number in (0, 100]``.
``docs/configuration.md`` lists every key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from fedmq.codec import DEFAULT_LIMITS
from fedmq.config_checks import (
    at_most,
    check_cluster,
    check_device_task,
    check_privacy,
    check_strategy,
    check_task,
    key_of,
    show,
)
from fedmq.config_rules import (
    INT_MAX,
    RULES,
    Rule,
)
from fedmq.config_schema import (
    STRATEGY_DEFAULTS,
    AgentConfig,
    AggregatorConfig,
    BrokerConfig,
    ClusterConfig,
    CompressionConfig,
    DataConfig,
    DeviceConfig,
    DeviceTaskConfig,
    DurabilityConfig,
    LimitsConfig,
    MetricsConfig,
    ModelConfig,
    PrivacyConfig,
    RobustConfig,
    RoundsConfig,
    SamplingConfig,
    SigningConfig,
    StrategyConfig,
    TaskConfig,
    TrainerConfig,
    TrainSettings,
    TrustConfig,
)
from fedmq.errors import ConfigError
from fedmq.topics import check_name

__all__ = [
    "DEVICE_ID_ENV",
    "RULES",
    "STRATEGY_DEFAULTS",
    "AgentConfig",
    "AggregatorConfig",
    "BrokerConfig",
    "ClusterConfig",
    "CompressionConfig",
    "DataConfig",
    "DeviceConfig",
    "DeviceTaskConfig",
    "DurabilityConfig",
    "LimitsConfig",
    "MetricsConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RobustConfig",
    "RoundsConfig",
    "Rule",
    "SamplingConfig",
    "SigningConfig",
    "StrategyConfig",
    "TaskConfig",
    "TrainSettings",
    "TrainerConfig",
    "TrustConfig",
    "build",
    "check_agent",
    "check_aggregator",
    "load_agent",
    "load_aggregator",
]

C = TypeVar("C")


def _type_ok(value: Any, tp: Any) -> bool:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in get_args(tp))
    if origin is Literal:
        return isinstance(value, str) and value in get_args(tp)
    if origin is list:
        (item,) = get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin is dict:  # a free-form table ([trainer] options): any TOML values, string keys
        return isinstance(value, dict)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # TOML writes 5 for 5.0; accept integers where a float is expected
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):  # X | None: TOML cannot write None, so just X
        return " or ".join(_describe(a) for a in get_args(tp) if a is not type(None))
    if origin is Literal:
        return " or ".join(json.dumps(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_describe(get_args(tp)[0]).removeprefix('an ').removeprefix('a ')}s"
    if origin is dict:
        return "a table"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _as_float(value: Any, tp: Any) -> Any:
    """An integer read for a float key (``float`` or ``float | None``) as a float."""
    takes = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
    if float in takes and int not in takes and isinstance(value, int) \
            and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float: as good as infinite
            return math.inf
    return value


def _check_value(rule: Rule | None, path: str, value: Any, written: Any = None) -> None:
    """Raise unless ``rule`` allows ``value`` (shown as ``written``, the file's spelling)."""
    if rule is None or value is None:
        return
    try:
        good = rule.ok(value)
    except (TypeError, ValueError):  # a config built in code with a wrong type
        good = False
    if not good:
        shown = show(value if written is None else written)
        raise ConfigError(f"{key_of(path)} = {shown} must be {rule.says}")


#: Most extra ``[train]`` keys: the announcement's ``train`` map holds at most
#: ``DEFAULT_LIMITS.max_entries`` entries, four of them the known settings.
MAX_EXTRA_TRAIN_KEYS = DEFAULT_LIMITS.max_entries - 4


def _rest_field(cls: type[Any]) -> str | None:
    """The field (``metadata={"rest": True}``) that takes a section's other keys, if any."""
    return next((f.name for f in dataclasses.fields(cls) if f.metadata.get("rest")), None)


def check_extra_setting(path: str, value: Any) -> None:
    """Raise unless ``value`` can travel as an extra ``[train]`` key: in the round
    announcement's ``train`` map, which carries strings and numbers (integers 0 to 2**63 - 1,
    finite floats), so no booleans, tables or lists."""
    hint = ("extra [train] keys go to the devices' trainers in the round announcement, which "
            "carries numbers and strings")
    if isinstance(value, bool):
        raise ConfigError(f"{key_of(path)} = {show(value)} must be a number or a string "
                          f"({hint}: write 1 or 0)")
    if isinstance(value, int):
        if not 0 <= value <= INT_MAX:
            raise ConfigError(f"{key_of(path)} = {show(value)} must be an integer in "
                              f"[0, 2**63 - 1], or a float ({hint}; integers are unsigned: "
                              f"write {show(float(value)) if value < 0 else 'it'} as a float)")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{key_of(path)} = {show(value)} must be a finite number")
    elif not isinstance(value, str):
        raise ConfigError(f"{key_of(path)} = {show(value)} must be a number or a string ({hint})")


def build(cls: type[C], data: Mapping[str, Any], where: str = "") -> C:
    """Build dataclass ``cls`` from a mapping, checking every key, type and value (``RULES``).

    Messages name the key as ``[section] key`` but not the file: ``load_*`` prefix that. A
    section with a "rest" field (``[train]``) takes its unknown keys into it instead of
    refusing them.
    """
    hints = get_type_hints(cls)
    rest = _rest_field(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {rest}  # type: ignore[arg-type]
    rules = RULES.get(cls, {})
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}{key}"
        if key not in names and rest is not None:
            check_extra_setting(path, value)
            kwargs.setdefault(rest, {})[key] = value
            continue
        if key not in names:
            raise ConfigError(f"unknown key `{path}` (known: {', '.join(sorted(names))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"`{path}` must be a table ([{path}])")
            kwargs[key] = build(tp, value, f"{path}.")  # type: ignore[arg-type]
            continue
        if not _type_ok(value, tp):
            raise ConfigError(f"{key_of(path)} = {show(value)} must be {_describe(tp)}")
        kwargs[key] = _as_float(value, tp)
        _check_value(rules.get(key), path, kwargs[key], value)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"[{where.rstrip('.')}] {exc}" if where else str(exc)) from None


def _check_fields(obj: Any, where: str = "") -> None:
    """Apply ``RULES`` to every value of a built config (a file's values were checked by build)."""
    rules = RULES.get(type(obj), {})
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, f"{where}{f.name}.")
        else:
            _check_value(rules.get(f.name), f"{where}{f.name}", value)


@contextmanager
def _in_file(name: str) -> Iterator[None]:
    """Prefix ConfigErrors with the file's name, on one line."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(" ".join(f"{name}: {exc}".splitlines())) from None


def _read(p: Path) -> dict[str, Any]:
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {p} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: not UTF-8 (byte {exc.start})") from None
    except (tomllib.TOMLDecodeError, ValueError) as exc:  # ValueError: a 4300+ digit integer
        raise ConfigError(" ".join(f"{p} is not valid TOML: {exc}".splitlines())) from None


def _load(cls: type[C], path: str | Path) -> C:
    data = _read(Path(path))
    with _in_file(str(path)):
        return build(cls, data)


def _check_broker(b: BrokerConfig) -> None:
    at_most("broker.reconnect_min_s", b.reconnect_min_s, "broker.reconnect_max_s",
             b.reconnect_max_s)


def load_aggregator(path: str | Path) -> AggregatorConfig:
    """Read and check an aggregator config file; a ConfigError names the file and the key."""
    cfg = _load(AggregatorConfig, path)
    check_aggregator(cfg, str(path))
    return cfg


def check_aggregator(cfg: AggregatorConfig, where: str = "config") -> None:
    """Raise ConfigError (prefixed ``where:``) for a value out of range, or values that cannot
    work together."""
    with _in_file(where):
        _check_fields(cfg)
        r = cfg.rounds
        at_most("rounds.min_updates", r.min_updates, "rounds.max_updates", r.max_updates)
        if r.mode == "async":  # a partial buffer is published at the deadline from min_updates
            at_most("rounds.min_updates", r.min_updates, "rounds.buffer_size", r.buffer_size)
            if cfg.task.kind != "train":  # a statistic has no model version to be stale against
                raise ConfigError('[rounds] mode = "async" only applies with [task] kind = '
                                  f'"train" (it is "{cfg.task.kind}")')
        if r.below_quorum == "reannounce" and r.max_extensions:
            raise ConfigError(f"[rounds] max_extensions = {r.max_extensions} only applies with "
                              '[rounds] below_quorum = "extend" (it is "reannounce")')
        if cfg.robust.clip_norm is not None:
            at_most("robust.clip_norm", cfg.robust.clip_norm, "robust.max_norm",
                     cfg.robust.max_norm)
        # A chunk above the size limit would be rejected as oversize.
        at_most("compression.max_chunk_bytes", cfg.compression.max_chunk_bytes,
                 "limits.max_update_bytes", cfg.limits.max_update_bytes)
        _check_train_extra(cfg.train)
        _check_broker(cfg.broker)
        check_strategy(cfg.strategy)
        check_task(cfg)
        check_privacy(cfg)
        check_cluster(cfg)
        if cfg.security.signing_key:  # read now: a bad key file fails at start-up
            from fedmq.keys import load_signer

            load_signer(cfg.security.signing_key)


def _check_train_extra(train: TrainSettings) -> None:
    """The extra ``[train]`` keys fit the announcement (a config built in code included)."""
    known = {f.name for f in dataclasses.fields(train)} - {"extra"}
    for key, value in train.extra.items():
        if key in known:
            raise ConfigError(f"[train] extra key {key!r} is a [train] setting: set "
                              f"[train] {key} instead")
        check_extra_setting(f"train.{key}", value)
    if len(train.extra) > MAX_EXTRA_TRAIN_KEYS:
        raise ConfigError(f"[train] has {len(train.extra)} extra keys: at most "
                          f"{MAX_EXTRA_TRAIN_KEYS} fit in a round announcement")


#: The environment variable ``load_agent`` takes the device id from (after ``--device-id``).
DEVICE_ID_ENV = "FEDMQ_DEVICE_ID"


def load_agent(path: str | Path, device_id: str | None = None,
               environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read and check a device agent config file (the device id is resolved too).

    The device id is, first found: ``device_id`` (``fedmq agent --device-id``), the variable
    ``FEDMQ_DEVICE_ID`` in ``environ`` (default ``os.environ``), ``[device] id``, the variable
    ``[device] id_from_env`` names. The first two replace ``[device] id`` in the result, so one
    agent.toml serves every device.
    """
    cfg = _load(AgentConfig, path)
    env = os.environ if environ is None else environ
    given, source = device_id, "--device-id"
    if given is None:
        given, source = env.get(DEVICE_ID_ENV) or None, f"${DEVICE_ID_ENV}"
    if given is not None:
        try:
            check_name(given, "device id")
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        cfg = dataclasses.replace(cfg, device=dataclasses.replace(cfg.device, id=given))
    check_agent(cfg, str(path))
    return cfg


def check_agent(cfg: AgentConfig, where: str = "config") -> None:
    """Like ``check_aggregator``, for the agent; also resolves the device id."""
    with _in_file(where):
        _check_fields(cfg)
        cfg.device_id()
        d = cfg.data
        if d.shard >= d.num_shards:
            raise ConfigError(f"[data] shard = {d.shard} must be < [data] num_shards = "
                              f"{d.num_shards}")
        if d.source == "npz" and d.path is None:
            raise ConfigError('[data] source = "npz" needs [data] path')
        _check_broker(cfg.broker)
        check_device_task(cfg)
