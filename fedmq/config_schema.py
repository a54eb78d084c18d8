"""The configuration's keys and defaults: one frozen dataclass per TOML section.

``fedmq.config`` reads files into these strictly (types, ranges, one line per failure) and is
the module to import them from; ``docs/configuration.md`` lists every key.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from fedmq.errors import ConfigError
from fedmq.models import DEFAULT_LAYER_SIZES
from fedmq.topics import check_name

__all__ = [
    "STRATEGY_DEFAULTS",
    "AgentConfig",
    "AggregatorConfig",
    "BrokerConfig",
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
    "SamplingConfig",
    "StrategyConfig",
    "TaskConfig",
    "TrainSettings",
    "TrainerConfig",
]


@dataclass(frozen=True)
class BrokerConfig:
    """How to reach the MQTT broker."""

    host: str = "127.0.0.1"
    port: int = 1883
    #: MQTT 5 by default; set false for MQTT 3.1.1-only brokers (the embedded amqtt one).
    mqtt5: bool = True
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    client_id: str | None = None
    #: Reconnect back-off: full jitter between 0 and min(max, min * 2**attempt) seconds.
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    #: Other nodes of the same clustered broker ("HOST:PORT"): after a failed connect or a lost
    #: connection the next attempt goes to the next of host:port and these, in turn.
    failover: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ModelConfig:
    """The initial global model: a chain of dense layers, or arrays from an ``.npz`` file."""

    layers: list[int] = field(default_factory=lambda: list(DEFAULT_LAYER_SIZES))
    seed: int = 0
    path: str | None = None


@dataclass(frozen=True)
class RoundsConfig:
    """When a round closes (see docs/rounds.md)."""

    min_updates: int = 2
    max_updates: int = 100
    deadline_s: float = 60.0
    grace_s: float = 5.0
    below_quorum: Literal["extend", "reannounce"] = "extend"
    max_extensions: int = 0
    #: Stop after this many completed rounds (0 = run until stopped).
    max_rounds: int = 0
    #: Below quorum with nothing received for this long: one warning line (repeated at most
    #: this often) saying what the round waits for.
    idle_warn_s: float = 30.0
    #: "sync" (the rounds above) or "async": buffered asynchronous aggregation (FedBuff,
    #: docs/rounds.md "Asynchronous mode"), a new version every ``buffer_size`` folded updates.
    mode: Literal["sync", "async"] = "sync"
    #: async: folded updates per new model version (FedBuff's K).
    buffer_size: int = 10
    #: async: an update whose base version is more than this many versions behind is ``stale``.
    max_staleness: int = 10
    #: async: an update ``s`` versions stale folds with ``1/sqrt(1+s)`` ("sqrt"),
    #: ``(1+s)**-staleness_exponent`` ("poly") or 1 ("constant") times its weight.
    staleness_weight: Literal["sqrt", "poly", "constant"] = "sqrt"
    staleness_exponent: float = 0.5


@dataclass(frozen=True)
class TrainSettings:
    """Local training settings sent to devices in each round announcement."""

    # Tuned on digits (benchmarks/sim_fedavg.py); device_agent.trainers.TrainConfig agrees.
    epochs: int = 5
    batch_size: int = 10
    lr: float = 0.3
    #: Seeds the devices' local training with each round's number (``TrainConfig.seed``).
    seed: int = 0
    #: FedProx's mu: the built-in trainers add mu/2 * ||w - w_global||^2 to their loss (0: off).
    proximal_mu: float = 0.0
    #: Every other ``[train]`` key, sent as is in the announcement's ``train`` map for custom
    #: trainers (``TrainConfig.extra``): numbers and strings, as the wire carries them.
    extra: dict[str, float | int | str] = field(default_factory=dict, metadata={"rest": True})


@dataclass(frozen=True)
class SamplingConfig:
    """Server-free device selection: each device decides from hash(seed, round, id) < rate."""

    rate: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class LimitsConfig:
    """Caps on what the network may send."""

    max_update_bytes: int = 64 * 1024 * 1024
    #: The most examples one update may count with: the weight of any one device is bounded.
    #: Size it to the largest honest local data set (docs/robustness.md).
    max_examples: int = 10_000
    #: Over ``max_examples``: "cap" counts the update with ``max_examples``; "reject" rejects
    #: it (``invalid_weight``).
    weight_mode: Literal["cap", "reject"] = "cap"
    #: Rejections are logged as one summary line per reason at most this often (each single
    #: rejection at DEBUG).
    reject_log_every_s: float = 60.0


@dataclass(frozen=True)
class RobustConfig:
    """Bounded influence of any one update (docs/robustness.md)."""

    #: Over the norm bound an update is scaled down to it ("clip"), rejected ("reject"), or
    #: nothing is bounded ("off").
    mode: Literal["clip", "reject", "off"] = "clip"
    #: A fixed L2 bound on each update; unset: adaptive, ``clip_multiplier`` times a running
    #: estimate of the median norm of accepted updates (Andrew et al. 2021).
    clip_norm: float | None = None
    clip_multiplier: float = 3.0
    #: Hard ceiling on the bound, adaptive or not; also the bound before any estimate exists.
    max_norm: float = 10_000.0
    #: The adaptive estimate's starting value (unset: the first round's median norm).
    initial_norm: float | None = None
    #: Which quantile of the norms the estimate tracks, and its geometric step per round.
    target_quantile: float = 0.5
    adapt_rate: float = 0.2
    #: A round whose new model moves farther than this (L2) from its base is abandoned.
    max_change_norm: float = 100_000.0


@dataclass(frozen=True)
class PrivacyConfig:
    """What the federation hides (docs/privacy.md, docs/security.md)."""

    #: Differential privacy (DP-FedAvg): the Gaussian noise's standard deviation on the round's
    #: sum of clipped updates, in units of ``clip_norm`` (0: no noise, no DP).
    noise_multiplier: float = 0.0
    #: DP: the L2 bound each update's delta is clipped to; required with noise, and then the
    #: norm bound in force ([robust] clip_norm unset or the same value).
    clip_norm: float | None = None
    #: DP: the run stops before a round would take epsilon past this (unset: no limit).
    target_epsilon: float | None = None
    #: DP: the delta of the reported (epsilon, delta) guarantee.
    delta: float = 1e-5
    #: Secure aggregation of masked updates (docs/security.md).
    secure_aggregation: bool = False


@dataclass(frozen=True)
class SigningConfig:
    """The aggregator's ``[security]``: the private key that signs every model and round
    announcement (``fedmq keys generate``; docs/security.md, "Signed models")."""

    #: Path of the Ed25519 private key (PEM); unset: nothing is signed.
    signing_key: str | None = None


@dataclass(frozen=True)
class TrustConfig:
    """The agent's ``[security]``: the federation's public keys (base64, as ``fedmq keys
    generate`` prints them). Set: only models and announcements signed by one of them are used;
    several during a key rotation. Empty: nothing is verified."""

    trusted_keys: list[str] = field(default_factory=list)


#: Each strategy's settings and their defaults (docs/learning.md): a key the chosen strategy has
#: no use for is refused (``check_aggregator``), not silently ignored.
STRATEGY_DEFAULTS: dict[str, dict[str, float]] = {
    "fedavg": {"server_lr": 1.0},
    "fedavgm": {"server_lr": 1.0, "momentum": 0.9},
    "fedadam": {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedyogi": {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "fedadagrad": {"server_lr": 0.1, "beta1": 0.9, "tau": 1e-3},
}


@dataclass(frozen=True)
class StrategyConfig:
    """The aggregation strategy: FedAvg or a server optimizer (docs/learning.md)."""

    name: Literal["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"] = "fedavg"
    #: The optimizer's settings; unset (None) means the named strategy's default
    #: (``STRATEGY_DEFAULTS``; ``settings()`` resolves them).
    server_lr: float | None = None
    momentum: float | None = None
    beta1: float | None = None
    beta2: float | None = None
    tau: float | None = None
    #: Threads for folding a dense tensor of at least 2M elements (0 = every core, the
    #: default: the kernels release the GIL, and measured ingest over a broker on the same
    #: 2-core host was no worse for it). Set 1 to keep folding on one core.
    fold_threads: int = 0

    def settings(self) -> dict[str, float]:
        """The named strategy's settings: its defaults, replaced by the keys that are set."""
        return {key: default if (value := getattr(self, key)) is None else value
                for key, default in STRATEGY_DEFAULTS[self.name].items()}


@dataclass(frozen=True)
class CompressionConfig:
    """How devices encode updates (sent in each announcement) and how big a message may be."""

    codec: Literal["fp32", "fp16", "int8", "topk"] = "fp32"
    #: int8 (and topk with int8 values): values per float32 scale.
    block: int = 256
    #: topk: fraction of entries kept.
    fraction: float = 0.01
    #: topk: how kept values are encoded.
    values: Literal["int8", "fp16"] = "int8"
    #: Larger updates and models are split into chunks (also never above the broker's
    #: Maximum Packet Size from CONNACK).
    max_chunk_bytes: int = 256 * 1024


@dataclass(frozen=True)
class DurabilityConfig:
    """Crash safety (docs/operations.md): write-ahead log, snapshots, persistent session."""

    #: Directory for the log and snapshots; unset = nothing survives a restart.
    state_dir: str | None = None
    #: How long the broker keeps the aggregator's session (and queues updates) while it is down.
    session_expiry_s: int = 86_400
    #: Published models kept in ``state_dir``/models for rollback (docs/operations.md).
    history_keep: int = 10
    #: Also snapshot within a round after this many accepted updates (0: never), or after
    #: this many seconds with new updates (0: never); bounds the replay after a crash.
    snapshot_every_updates: int = 1000
    snapshot_every_s: float = 300.0


@dataclass(frozen=True)
class MetricsConfig:
    """The aggregator's Prometheus endpoint (``/metrics``) and health check (``/healthz``)."""

    #: ``HOST:PORT`` to serve on (e.g. ``0.0.0.0:9464``); empty: no HTTP endpoint. Needs the
    #: ``prometheus-client`` package (the ``aggregator`` extra).
    listen: str = ""


@dataclass(frozen=True)
class TaskConfig:
    """What the federation computes: a model ("train") or statistics of the devices' values
    ("statistics": federated analytics, docs/analytics.md)."""

    kind: Literal["train", "statistics"] = "train"
    #: statistics: the columns every device summarizes.
    columns: list[str] = field(default_factory=list)
    #: statistics: every column's histogram, ``[lo, hi, nbins]``: nbins equal bins over
    #: [lo, hi] (numpy.linspace's edges), plus underflow and overflow counters.
    bins: list[float] | None = None
    #: statistics: explicit bin edges for every column, strictly increasing (instead of bins).
    edges: list[float] | None = None
    #: statistics: ``{column = [lo, hi, nbins]}``, a column's own bins (instead of the above).
    column_bins: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterConfig:
    """Scale-out (docs/scaling.md): one coordinator owns the rounds, workers fold shards."""

    #: "single": one aggregator does everything (the default); "coordinator": rounds, quorum
    #: from the workers' progress, merge of their partials, the model; "worker": folds the
    #: updates of its shard (or of its site, as an edge gateway) and sends its partial.
    role: Literal["single", "coordinator", "worker"] = "single"
    #: worker: this worker's name (unique in the federation; its topics and client id).
    name: str = ""
    #: coordinator: every worker's name; a round's model waits for each one's partial.
    workers: list[str] = field(default_factory=list)
    #: worker: the engine's number of update partitions (0: no partitioning, the worker reads
    #: every device's ``update/+``, as an edge gateway does) and this worker's partition.
    shards: int = 0
    shard: int = 0
    #: worker: ``HOST:PORT`` of the coordinator's broker when it is not [broker] (an edge
    #: gateway: devices on the site's broker, rounds and partials upstream).
    upstream: str = ""
    #: worker: seconds between progress reports while updates arrive (and the heartbeat is
    #: ten of these); coordinator: seconds between repeated collect requests.
    progress_interval_s: float = 0.2


@dataclass(frozen=True)
class AggregatorConfig:
    """``fedmq aggregator --config aggregator.toml``."""

    federation: str = "default"
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    durability: DurabilityConfig = field(default_factory=DurabilityConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    security: SigningConfig = field(default_factory=SigningConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


@dataclass(frozen=True)
class DeviceConfig:
    """Who this device is."""

    id: str | None = None
    #: Read the id from this environment variable when ``id`` is not set (e.g. HOSTNAME).
    id_from_env: str | None = None
    #: Where the agent keeps state that must survive a restart (the compression residual and
    #: the outbox of unacknowledged updates). Unset: kept in memory only.
    state_dir: str | None = None
    #: Bounds of the outbox (``state_dir``/outbox): when a new update does not fit, the oldest
    #: whole updates are dropped (device_agent/outbox.py).
    outbox_max_bytes: int = 64 * 1024 * 1024
    outbox_max_messages: int = 1000
    #: Asynchronous rounds: at least this many seconds from one training's start to the next
    #: (the agent also never trains twice from one model version).
    min_interval_s: float = 0.0
    #: QoS of the agent's subscriptions. 0 on a NATS cluster, where every QoS 1 subscription
    #: is a JetStream consumer (docs/scaling.md); the round and model are retained, so what a
    #: QoS 0 subscription misses comes back when the agent subscribes again. Secure
    #: aggregation's messages are not retained: keep 1 where it runs (never on a cluster).
    subscribe_qos: int = 1

    def __post_init__(self) -> None:
        if self.outbox_max_bytes < 1 or self.outbox_max_messages < 1:
            raise ValueError("outbox_max_bytes and outbox_max_messages must be positive")


@dataclass(frozen=True)
class DataConfig:
    """Where the device's local data comes from."""

    #: "digits" (one shard of the digits shipped with fedmq) or "npz" (arrays x and y in ``path``).
    source: Literal["digits", "npz"] = "digits"
    path: str | None = None
    partition: Literal["iid", "shards"] = "iid"
    num_shards: int = 1
    shard: int = 0
    shard_from_env: str | None = None
    seed: int = 0
    #: Fraction of the local examples held out (never trained on) to evaluate every new global
    #: model on (federated evaluation). 0: no evaluation reports; 1: an evaluation-only device.
    eval_fraction: float = 0.2


@dataclass(frozen=True)
class TrainerConfig:
    """Which trainer runs on the device: "mlp", "softmax", or "package.module:factory"."""

    kind: str = "mlp"
    #: Keyword arguments of a "package.module:factory" trainer: ``factory(config, **options)``.
    #: The built-in trainers take none.
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceTaskConfig:
    """What the device computes: "train" (updates from its trainer) or "statistics" (a summary
    of its values for the columns the aggregator asks for, docs/analytics.md)."""

    kind: Literal["train", "statistics"] = "train"
    #: statistics: the only columns this device shares (empty: every one asked for that its data
    #: has); a column asked for and not shared is contributed empty (count 0).
    columns: list[str] = field(default_factory=list)
    #: statistics: "package.module:function" called as ``function(config)`` each round and
    #: returning ``{column: 1-D values}``; unset: the arrays of the [data] npz file.
    statistics: str | None = None


_GIVE_ID = "pass --device-id ID, set FEDMQ_DEVICE_ID, or set [device] id in the file"


@dataclass(frozen=True)
class AgentConfig:
    """``fedmq agent --config agent.toml``."""

    federation: str = "default"
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    task: DeviceTaskConfig = field(default_factory=DeviceTaskConfig)
    security: TrustConfig = field(default_factory=TrustConfig)

    def device_id(self) -> str:
        """The device id: ``[device] id``, else the environment variable ``id_from_env`` names.

        ``fedmq.config.load_agent`` has already put ``--device-id`` or ``$FEDMQ_DEVICE_ID``, when
        given, into ``id``: they come first.
        """
        value = self.device.id
        var = self.device.id_from_env
        if value is None and var:
            value = os.environ.get(var)
            if not value:
                raise ConfigError(f'[device] id_from_env = "{var}" but ${var} is unset or empty; '
                                  f"every agent needs its own device id: {_GIVE_ID}")
        if not value:
            raise ConfigError(f"no device id: {_GIVE_ID} (every agent needs its own)")
        try:
            return check_name(value, "device id")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def shard(self) -> int:
        """The data shard index: ``shard``, or the named environment variable.

        When ``shard_from_env`` names a variable that is not set (replicas of one container
        share one environment), the shard is sha256(device id) mod ``num_shards``: stable per
        device, spread across the shards.
        """
        var = self.data.shard_from_env
        if var:
            raw = os.environ.get(var)
            if raw is None:
                digest = hashlib.sha256(self.device_id().encode()).digest()
                return int.from_bytes(digest[:8], "big") % self.data.num_shards
            try:
                return int(raw)
            except ValueError:
                raise ConfigError(f"${var}={raw!r} is not an integer shard index") from None
        return self.data.shard
