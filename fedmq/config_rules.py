"""What each configuration value must be beyond its type (``RULES``), per section and key:
ranges, names, listen addresses, statistics bins, keys. ``fedmq.config`` checks every value
read from a file, and every config built in code, against them."""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fedmq.codec import DEFAULT_LIMITS, MAX_BINS, MAX_COLUMNS
from fedmq.compression import MAX_BLOCK
from fedmq.config_schema import (
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
from fedmq.models import MAX_BATCH_SIZE, MAX_EPOCHS, MAX_LR, MAX_PROXIMAL_MU
from fedmq.topics import check_name

# ---------------------------------------------------------------- value rules


@dataclass(frozen=True)
class Rule:
    """What a key's value must be beyond its type: ``ok(value)`` holds, described by ``says``."""

    ok: Callable[[Any], bool]
    says: str


#: TOML integers are 64-bit, and so are the wire's: no integer key goes above this.
INT_MAX = (1 << 63) - 1
#: Durations are waited on (threading caps a timeout near 9.2e9 s): at most about 31 years.
MAX_SECONDS = 1e9
#: Async rounds remember the updates of the last ``max_staleness`` buffers (duplicates): both
#: are bounded so that memory stays bounded.
MAX_ASYNC = 1_000_000


def _ints(lo: int, hi: int = INT_MAX) -> Rule:
    return Rule(lambda v: lo <= v <= hi,
                f"an integer in [{lo}, {'2**63 - 1' if hi == INT_MAX else hi}]")


def _numbers(lo: float, hi: float, *, lo_open: bool = True, hi_open: bool = False,
             says: str = "") -> Rule:
    def ok(v: float) -> bool:
        return (math.isfinite(v) and (lo < v if lo_open else lo <= v)
                and (v < hi if hi_open else v <= hi))

    interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return Rule(ok, says or f"a finite number in {interval}")


def _positive() -> Rule:
    return Rule(lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def _seconds(*, zero: bool = False) -> Rule:
    return _numbers(0.0, MAX_SECONDS, lo_open=not zero,
                    says=f"a finite number of seconds {'>=' if zero else '>'} 0 (at most 1e9)")


def _is_name(value: str) -> bool:
    try:
        check_name(value, "name")
    except ValueError:
        return False
    return True


_NAME = Rule(_is_name, "1-64 characters of letters, digits, '_', '.' or '-' (it becomes one "
                       "MQTT topic level)")
_TEXT = Rule(lambda v: v != "" and "\0" not in v, "a non-empty string without NUL characters")
_ENV = Rule(lambda v: v != "" and "=" not in v and "\0" not in v,
            "an environment variable name (non-empty, without '=' or NUL)")
# A dense layer's weight matrix is one tensor: devices refuse tensors above the decoder's limit.
_MAX_TENSOR = DEFAULT_LIMITS.max_elements
_LAYERS = Rule(
    lambda v: len(v) >= 2 and all(s >= 1 for s in v)
    and all(a * b <= _MAX_TENSOR for a, b in itertools.pairwise(v)),
    "a list of at least 2 sizes >= 1 (input, ..., output), the product of each two neighbours "
    f"at most {_MAX_TENSOR} (the largest tensor a device decodes)")


def _is_listen(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return value == "" or (bool(sep) and port.isdigit() and 1 <= int(port) <= 65535
                           and "\0" not in host)


_LISTEN = Rule(_is_listen, "HOST:PORT (e.g. 0.0.0.0:9464 or 127.0.0.1:9464), or empty for none")
_ENDPOINTS = Rule(lambda v: len(set(v)) == len(v) and all(
    _is_listen(e) and e.rpartition(":")[0] != "" for e in v),
    'a list of distinct "HOST:PORT" endpoints (e.g. ["10.0.0.2:1883", "10.0.0.3:1883"])')

def _is_bins(v: list[float]) -> bool:
    return (len(v) == 3 and all(math.isfinite(x) for x in v) and v[0] < v[1]
            and float(v[2]).is_integer() and 1 <= v[2] <= MAX_BINS)


_BINS = Rule(_is_bins, f"[lo, hi, nbins]: finite lo < hi and an integer nbins in [1, {MAX_BINS}]")
_EDGES = Rule(lambda v: 2 <= len(v) <= MAX_BINS + 1 and all(math.isfinite(x) for x in v)
              and all(b > a for a, b in itertools.pairwise(v)),
              f"2 to {MAX_BINS + 1} finite numbers, strictly increasing")
_COLUMNS = Rule(lambda v: len(v) <= MAX_COLUMNS and len(set(v)) == len(v)
                and all(0 < len(c) <= 200 and "\0" not in c for c in v),
                f"at most {MAX_COLUMNS} distinct names of 1-200 characters (no NUL)")
_COLUMN_BINS = Rule(lambda v: all(isinstance(k, str) and isinstance(b, list) and all(
    isinstance(x, int | float) and not isinstance(x, bool) for x in b) and _is_bins(b)
    for k, b in v.items()), "a table of column = [lo, hi, nbins] (finite lo < hi, an integer "
    f"nbins in [1, {MAX_BINS}])")
def _are_keys(v: list[str]) -> bool:
    from fedmq.signing import parse_public  # cryptography: only when keys are given

    for text in v:
        parse_public(text)  # ValueError: refused by _check_value
    return len(set(v)) == len(v)


_KEYS = Rule(_are_keys, "a list of distinct Ed25519 public keys, each 44 characters of base64 "
                        "(or 64 hex digits) as `fedmq keys generate` prints")
_OPTIONAL_NAME = Rule(lambda v: v == "" or _is_name(v),
                      "empty or 1-64 characters of letters, digits, '_', '.' or '-'")
_NAMES = Rule(lambda v: len(set(v)) == len(v) and all(_is_name(n) for n in v),
              "a list of distinct names, each 1-64 characters of letters, digits, '_', '.' or "
              "'-'")
_FUNCTION = Rule(lambda v: bool(re.fullmatch(r"[\w.]+:[\w.]+", v)),
                 '"package.module:function"')

#: Per section, per key: what a value must be beyond its type (checked for every value read from
#: a file, and by ``check_aggregator`` / ``check_agent``). Keys without a rule are the booleans,
#: the choices (``Literal``: the type check already limits them) and the broker credentials.
RULES: dict[type, dict[str, Rule]] = {
    AggregatorConfig: {"federation": _NAME},
    AgentConfig: {"federation": _NAME},
    BrokerConfig: {
        "host": _TEXT,
        "port": _ints(1, 65535),
        "ca_file": _TEXT,
        "cert_file": _TEXT,
        "key_file": _TEXT,
        "keepalive": _ints(1, 65535),  # MQTT's Keep Alive is 16 bits; 0 would turn it off
        "client_id": _TEXT,
        "reconnect_min_s": _seconds(),
        "reconnect_max_s": _seconds(),
        "failover": _ENDPOINTS,
    },
    ModelConfig: {"layers": _LAYERS, "seed": _ints(0), "path": _TEXT},
    RoundsConfig: {
        "min_updates": _ints(1),
        "max_updates": _ints(1),
        "deadline_s": _seconds(),
        "grace_s": _seconds(zero=True),
        "max_extensions": _ints(0),
        "max_rounds": _ints(0),
        "idle_warn_s": _seconds(),
        "buffer_size": _ints(1, MAX_ASYNC),
        "max_staleness": _ints(0, MAX_ASYNC),
        "staleness_exponent": _numbers(0.0, 10.0, lo_open=False),
    },
    # The bounds devices enforce on an announcement (device_agent/trainers.py).
    TrainSettings: {
        "epochs": _ints(1, MAX_EPOCHS),
        "batch_size": _ints(1, MAX_BATCH_SIZE),
        "lr": _numbers(0.0, MAX_LR),
        "proximal_mu": _numbers(0.0, MAX_PROXIMAL_MU, lo_open=False),
        "seed": _ints(0),
    },
    SamplingConfig: {"rate": _numbers(0.0, 1.0, lo_open=False), "seed": _ints(0)},
    LimitsConfig: {
        "max_update_bytes": _ints(1),
        "max_examples": _ints(1),
        "reject_log_every_s": _seconds(),
    },
    RobustConfig: {
        "clip_norm": _positive(),
        "clip_multiplier": _positive(),
        "max_norm": _positive(),
        "initial_norm": _positive(),
        "target_quantile": _numbers(0.0, 1.0, hi_open=True),
        "adapt_rate": _numbers(0.0, 10.0),
        "max_change_norm": _positive(),
    },
    StrategyConfig: {
        "server_lr": _positive(),
        "momentum": _numbers(0.0, 1.0, lo_open=False, hi_open=True),
        "beta1": _numbers(0.0, 1.0, lo_open=False, hi_open=True),
        "beta2": _numbers(0.0, 1.0, lo_open=False, hi_open=True),
        "tau": _positive(),  # also keeps √v + τ > 0 where v is 0
        "fold_threads": _ints(0, 1024),
    },
    CompressionConfig: {
        "block": _ints(1, MAX_BLOCK),
        "fraction": _numbers(0.0, 1.0),
        "max_chunk_bytes": _ints(4096),
    },
    DurabilityConfig: {
        "state_dir": _TEXT,
        "session_expiry_s": _ints(0, (1 << 32) - 1),  # MQTT's Session Expiry Interval: 32 bits
        "history_keep": _ints(1),
        "snapshot_every_updates": _ints(0),
        "snapshot_every_s": _seconds(zero=True),
    },
    DeviceConfig: {
        "id": _NAME,
        "id_from_env": _ENV,
        "state_dir": _TEXT,
        "outbox_max_bytes": _ints(1),
        "outbox_max_messages": _ints(1),
        "min_interval_s": _seconds(zero=True),
        "subscribe_qos": _ints(0, 1),
    },
    DataConfig: {
        "path": _TEXT,
        "num_shards": _ints(1),
        "shard": _ints(0),
        "shard_from_env": _ENV,
        "seed": _ints(0, (1 << 32) - 1),  # a numpy RandomState seed splits the digits
        "eval_fraction": _numbers(0.0, 1.0, lo_open=False),
    },
    MetricsConfig: {"listen": _LISTEN},
    PrivacyConfig: {
        "noise_multiplier": _numbers(0.0, 1e6, lo_open=False),
        "clip_norm": _positive(),
        "target_epsilon": _numbers(0.0, 1e6),
        "delta": _numbers(0.0, 1.0, hi_open=True),
    },
    TrainerConfig: {"kind": _TEXT},
    TaskConfig: {"columns": _COLUMNS, "bins": _BINS, "edges": _EDGES,
                 "column_bins": _COLUMN_BINS},
    DeviceTaskConfig: {"columns": _COLUMNS, "statistics": _FUNCTION},
    SigningConfig: {"signing_key": _TEXT},
    TrustConfig: {"trusted_keys": _KEYS},
    ClusterConfig: {"name": _OPTIONAL_NAME, "workers": _NAMES, "shards": _ints(0, 1 << 16),
                    "shard": _ints(0, (1 << 16) - 1), "upstream": _LISTEN,
                    "progress_interval_s": _seconds()},
}


# ---------------------------------------------------------------- strict loading
