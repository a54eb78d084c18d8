"""``fedmq demo``: a whole federation on this machine, in one command.

A broker, the aggregator and N simulated devices, each its own MQTT client holding its own shard
of scikit-learn's digits. The demo itself is just another MQTT app: it subscribes to the model and
metrics topics and scores every new global model on a held-out test split the devices never see.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmq import demo_privacy, demo_signing
from fedmq.broker import BrokerHandle, start_broker
from fedmq.compression import decode_all
from fedmq.config import (
    AggregatorConfig,
    BrokerConfig,
    CompressionConfig,
    LimitsConfig,
    ModelConfig,
    RoundsConfig,
    SamplingConfig,
    StrategyConfig,
    TrainSettings,
)
from fedmq.demo_options import check_knobs
from fedmq.models import DEFAULT_LAYER_SIZES
from fedmq.subscriber import ModelSubscriber
from fedmq.wire import GlobalModel

log = logging.getLogger(__name__)

FEDERATION = "demo"

#: How long a round's line waits for the devices' evaluations of its model.
EVAL_WAIT_S = 5.0
#: Async mode: versions a slow device's update may lag, and the devices' pacing.
ASYNC_MAX_STALENESS = 20
ASYNC_MIN_INTERVAL_S = 0.05


@dataclass
class DemoResult:
    """What the demo measured (written with ``--json``)."""

    broker: str
    partition: str
    devices: int
    rounds: list[dict[str, Any]] = field(default_factory=list)
    final_accuracy: float = 0.0
    wall_s: float = 0.0
    #: ``--target`` and the first round whose central accuracy reached it (None: not reached).
    target: float | None = None
    reached_round: int | None = None
    #: "sync" rounds or "async" buffers (``--mode``): then each entry of ``rounds`` is a version.
    mode: str = "sync"

    codec: str = "fp32"
    #: ``[strategy] name`` and its settings, as the aggregator's log line says them.
    strategy: str = "fedavg"
    #: ``--noise-multiplier`` (0: no DP) and the epsilon after the last round (None: no DP).
    noise_multiplier: float = 0.0
    final_epsilon: float | None = None

    def as_json(self) -> dict[str, Any]:
        return {"broker": self.broker, "partition": self.partition, "devices": self.devices,
                "codec": self.codec, "strategy": self.strategy,
                "rounds": self.rounds, "final_accuracy": self.final_accuracy,
                "wall_s": self.wall_s, "target": self.target,
                "reached_round": self.reached_round, "mode": self.mode,
                "noise_multiplier": self.noise_multiplier, "final_epsilon": self.final_epsilon}


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the process exit code."""
    if getattr(args, "task", "train") == "statistics":  # federated analytics, its own module
        from fedmq.demo_statistics import run_statistics

        return run_statistics(args)
    return _run_training(args)


def _run_training(args: argparse.Namespace) -> int:
    """The training demo on digits."""
    # Unset on the command line: 20 of each (statistics has its own defaults).
    args.devices, args.rounds = (20 if v is None else v for v in (args.devices, args.rounds))
    problem = check_knobs(args)
    if problem:
        print(f"fedmq demo: {problem}", file=sys.stderr)
        return 2
    try:
        from aggregator.service import AggregatorService
        from device_agent.service import AgentService
        from device_agent.trainers import MLPTrainer, SoftmaxTrainer
        from fedmq.datasets import load_digits_split, partition
    except ImportError as exc:
        print(f"fedmq demo needs the demo extras ({exc.name} is missing): "
              "pip install 'fedmq[demo]'", file=sys.stderr)
        return 2

    started = time.monotonic()
    x_train, y_train, x_test, y_test = load_digits_split(args.seed)
    shards = partition(y_train, args.devices, args.partition, args.seed)
    layers = list(DEFAULT_LAYER_SIZES) if args.model == "mlp" else [64, 10]
    trainer_cls = MLPTrainer if args.model == "mlp" else SoftmaxTrainer
    scorer = trainer_cls(x_test, y_test, num_classes=10)

    with contextlib.ExitStack() as stack:
        opened = open_broker(stack, args.broker)
        if opened is None:
            return 1
        handle, broker_cfg = opened
        result = DemoResult(broker=handle.kind, partition=args.partition, devices=args.devices,
                            codec=args.codec, target=getattr(args, "target", None),
                            mode=getattr(args, "mode", "sync"))

        # The watcher subscribes before anything is published, like any app on the model topic.
        models, arrived, on_model = _model_inbox()
        signing_key, trusted = demo_signing.demo_key(stack, args)
        watcher = ModelSubscriber(broker_cfg, FEDERATION, summaries=True, evaluations=True,
                                  on_model=on_model, trusted_keys=trusted).start()
        stack.callback(watcher.stop)

        config = demo_signing.signed(
            demo_config(args, broker_cfg, layers, [len(s) for s in shards]), signing_key)
        agg = AggregatorService(config)
        result.strategy = agg.strategy.describe()
        agents = [AgentService.over_mqtt(FEDERATION, f"device-{i:03d}", trainer, broker_cfg,
                                         min_interval_s=_min_interval(args))
                  for i, trainer in enumerate(_trainers(args, trainer_cls, x_train, y_train,
                                                        shards))]
        for a in agents:
            a.gate = demo_signing.device_gate(trusted)  # each checks the aggregator's signatures
            a.start()
            stack.callback(a.stop)
        agg.start()
        stack.callback(agg.stop)

        if not _follow_rounds(watcher, models, args, scorer, result, arrived=arrived,
                              since=time.monotonic(), finished=agg.done.is_set):
            print(f"fedmq demo: timed out after {args.timeout:.0f} s with "
                  f"{len(result.rounds)}/{args.rounds} rounds done", file=sys.stderr)
            return 1
        result.final_accuracy = result.rounds[-1]["accuracy"]
        rejected = sum(agg.stats.rejected.values())
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(agg.stats.rejected.items()))
        clipped = agg.stats.clipped
    result.wall_s = round(time.monotonic() - started, 2)
    last = result.rounds[-1]
    if last["federated_accuracy"] is not None:
        print(f"federated evaluation of the final model: accuracy "
              f"{last['federated_accuracy']:.4f} on {last['federated_examples']} examples held "
              f"out on {last['federated_devices']} devices (central test split: "
              f"{result.final_accuracy:.4f} on {len(y_test)} examples)")
    _say_target(result)
    demo_privacy.report(args, result)
    print(f"final held-out accuracy {result.final_accuracy:.4f} after {len(result.rounds)} rounds "
          f"({args.partition}, {args.devices} devices, {result.strategy}, {args.codec}, "
          f"{result.broker} broker, {result.wall_s:.1f} s, "
          f"{rejected} updates rejected{': ' + reasons if reasons else ''}, "
          f"{clipped} clipped to the norm bound)")
    _write_json(args.json, result)
    return 0


def _write_json(path: Path | None, result: DemoResult) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.as_json(), indent=2))
        print(f"wrote {path}")


def _model_inbox() -> tuple[dict[int, GlobalModel], dict[int, float],
                            Callable[[GlobalModel], None]]:
    """The watcher's models by version, when each arrived, and the callback that fills both."""
    models: dict[int, GlobalModel] = {}
    arrived: dict[int, float] = {}

    def on_model(m: GlobalModel) -> None:
        arrived.setdefault(m.version, time.monotonic())
        models[m.version] = m

    return models, arrived, on_model


def _say_target(result: DemoResult) -> None:
    if result.target is not None:
        print(f"target accuracy {result.target:g}: " + (
            f"reached in round {result.reached_round}" if result.reached_round is not None
            else f"not reached in {len(result.rounds)} rounds"))


def _trainers(args: argparse.Namespace, trainer_cls: Any, x: Any, y: Any,
              shards: list[Any]) -> list[Any]:
    """One trainer per shard. Like ``fedmq agent``, each device holds a part of its shard out
    (``[data] eval_fraction``), never trains on it, and scores every new model on it: the
    federated evaluation printed beside the central score. ``--slow-fraction`` of them are
    ``--slow-factor`` times slower."""
    seed = args.seed
    from device_agent.factory import split_holdout
    from fedmq.config import DataConfig

    trainers = []
    for i, idx in enumerate(shards):
        x_fit, y_fit, x_eval, y_eval = split_holdout(x[idx], y[idx], DataConfig().eval_fraction,
                                                     seed * 1000 + i)
        trainers.append(trainer_cls(x_fit, y_fit, num_classes=10, holdout=(x_eval, y_eval)))
    for i in slow_devices(args.devices, args.slow_fraction, seed):
        trainers[i] = SlowTrainer(trainers[i], args.slow_factor)
    return trainers


class SlowTrainer:
    """A device that trains ``factor`` times slower (``--slow-fraction``): after each ``fit`` it
    waits ``factor - 1`` times as long as the fit took, like a weaker or busier device."""

    def __init__(self, inner: Any, factor: float) -> None:
        self.inner = inner
        self.factor = factor

    def fit(self, weights: Any, config: Any, round_seed: int) -> Any:
        started = time.monotonic()
        result = self.inner.fit(weights, config, round_seed)
        time.sleep(max(self.factor - 1.0, 0.0) * (time.monotonic() - started))
        return result

    def evaluate(self, weights: Any) -> Any:
        return self.inner.evaluate(weights)


def slow_devices(devices: int, fraction: float, seed: int) -> set[int]:
    """Which devices are slow: a seeded ``fraction`` of them (rounded)."""
    import numpy as np

    count = round(fraction * devices)
    return set(np.random.default_rng(seed + 7).permutation(devices)[:count].tolist())


def demo_config(args: argparse.Namespace, broker_cfg: BrokerConfig, layers: list[int],
                shard_sizes: list[int]) -> AggregatorConfig:
    """The demo federation's aggregator config (also the fault drills' "demo setting")."""
    from device_agent.trainers import TrainConfig
    privacy, robust = demo_privacy.privacy_sections(args)
    if getattr(args, "secure_aggregation", False):
        privacy = dataclasses.replace(privacy, secure_aggregation=True)
    return AggregatorConfig(
        federation=FEDERATION, broker=broker_cfg,
        model=ModelConfig(layers=layers, seed=args.seed),
        rounds=_rounds(args),
        sampling=SamplingConfig(rate=getattr(args, "fraction", 1.0), seed=args.seed),
        robust=robust, privacy=privacy,
        strategy=StrategyConfig(name=getattr(args, "strategy", "fedavg"),
                                server_lr=getattr(args, "server_lr", None)),
        train=_train_settings(args, TrainConfig()),
        # The operator's weight cap, sized as docs/robustness.md says: the largest honest
        # local data set, so no device counts for more than the biggest real one.
        limits=LimitsConfig(max_examples=max(shard_sizes)),
        compression=CompressionConfig(codec=args.codec, fraction=args.topk_fraction))


def _rounds(args: argparse.Namespace) -> RoundsConfig:
    """Every device every round: a round closes the moment all updates are in (the deadline
    only matters if a device is lost). With sampling, the size of a round's sample varies: it
    closes 2 s after half of the expected sample is in, or when every device has answered; a
    sample below that is redrawn every 10 s (docs/rounds.md)."""
    fraction = getattr(args, "fraction", 1.0)
    if getattr(args, "mode", "sync") == "async":
        # FedBuff's setting: a new version every K = half the devices' updates; a slow device's
        # update is folded up to ASYNC_MAX_STALENESS versions late, with weight 1/sqrt(1 + s).
        return RoundsConfig(mode="async", buffer_size=max(1, args.devices // 2), min_updates=1,
                            max_staleness=ASYNC_MAX_STALENESS, deadline_s=60.0,
                            max_rounds=args.rounds)
    if fraction >= 1.0:
        return RoundsConfig(min_updates=args.devices, max_updates=args.devices,
                            deadline_s=60.0, grace_s=1.0, max_rounds=args.rounds)
    quorum = max(1, round(0.5 * fraction * args.devices))
    # A short deadline: a sample smaller than the quorum is redrawn at each extension.
    return RoundsConfig(min_updates=quorum, max_updates=args.devices, deadline_s=10.0,
                        grace_s=2.0, max_rounds=args.rounds)


def _min_interval(args: argparse.Namespace) -> float:
    """Async devices pace themselves: at least this long from one training's start to the
    next (the slow ones are slower anyway). Sync rounds pace them already."""
    return ASYNC_MIN_INTERVAL_S if getattr(args, "mode", "sync") == "async" else 0.0


def _train_settings(args: argparse.Namespace, defaults: Any) -> TrainSettings:
    """The command line's training options, falling back to the trainer's tuned defaults."""
    return TrainSettings(
        epochs=args.epochs if args.epochs is not None else defaults.epochs,
        batch_size=args.batch_size if args.batch_size is not None else defaults.batch_size,
        lr=args.lr if args.lr is not None else defaults.lr,
        proximal_mu=getattr(args, "proximal_mu", 0.0))


def _follow_rounds(watcher: ModelSubscriber, models: dict[int, GlobalModel],  # noqa: PLR0917
                   args: argparse.Namespace, scorer: Any, result: DemoResult,
                   arrived: dict[int, float] | None = None, since: float = 0.0,
                   finished: Callable[[], bool] | None = None) -> bool:
    """Score each new model as it arrives on the model topic; False on timeout. A round's
    ``elapsed_s`` is when its model reached the watcher (``arrived``), from ``since``; with a
    ``result.target`` the rounds stop at the first model whose central accuracy reaches it.
    Once ``finished()`` (the aggregator ended the run early: its privacy budget) the rounds
    stop when no model is left to report."""
    deadline = time.monotonic() + args.timeout
    round_started = time.monotonic()
    ready_at: dict[int, float] = {}
    arrived = arrived if arrived is not None else {}
    ended_at: float | None = None
    while len(result.rounds) < args.rounds and result.reached_round is None:
        if time.monotonic() > deadline:
            return False
        watcher.poll(0.2)
        if finished is not None and finished():
            ended_at = ended_at or time.monotonic()
            if (len(result.rounds) + 1 not in models
                    and time.monotonic() - ended_at > 1.0):  # what was in flight is in
                break
        # A round is reported once its model and its summary are in (either order), and the
        # devices' evaluations of the model (every device, or after EVAL_WAIT_S).
        version = len(result.rounds) + 1
        while (version in models and version in watcher.summaries
               and result.reached_round is None):
            ev_msg = watcher.evaluations.get(version)
            first = ready_at.setdefault(version, time.monotonic())
            if (ev_msg is None or ev_msg.devices < args.devices) and (
                    time.monotonic() - first < _eval_wait(args)):
                break
            model, s = models.pop(version), watcher.summaries.pop(version)
            ev = scorer.evaluate(decode_all(model.tensors))
            fed_acc = ev_msg.metrics.get("eval_accuracy") if ev_msg else None
            fed_loss = ev_msg.metrics.get("eval_loss") if ev_msg else None
            entry = {"round": s.round, "version": version, "participants": s.participants,
                     "accuracy": ev.accuracy, "loss": ev.loss,
                     "federated_accuracy": fed_acc, "federated_loss": fed_loss,
                     "federated_examples": ev_msg.num_examples if ev_msg else 0,
                     "federated_devices": ev_msg.devices if ev_msg else 0,
                     "bytes_in": s.bytes_in,
                     "norm_bound": s.metrics.get("norm_bound"),
                     "clipped": int(s.metrics.get("clipped_updates", 0)),
                     "epsilon": s.metrics.get("dp_epsilon"),
                     "seconds": round(time.monotonic() - round_started, 3),
                     "elapsed_s": round(arrived.get(version, time.monotonic()) - since, 3)}
            round_started = time.monotonic()
            result.rounds.append(entry)
            if result.target is not None and ev.accuracy >= result.target:
                result.reached_round = version
            federated = (f"federated {fed_acc:.4f}" if fed_acc is not None
                         else "federated  —    ")
            if entry["epsilon"] is not None:
                federated += f"  epsilon {entry['epsilon']:.3f}"
            print(f"round {version:3d}/{args.rounds}  participants {s.participants:3d}  "
                  f"accuracy {ev.accuracy:.4f}  {federated}  loss {ev.loss:.4f}  "
                  f"received {_mb(s.bytes_in)}  ({entry['seconds']:.2f} s)", flush=True)
            version += 1
    return True


def _eval_wait(args: argparse.Namespace) -> float:
    """How long a version waits for every device's evaluation before it is reported: in async
    mode busy devices evaluate late, and the versions come faster."""
    return EVAL_WAIT_S if getattr(args, "mode", "sync") == "sync" else 0.5


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def open_broker(stack: contextlib.ExitStack, kind: str) -> tuple[BrokerHandle, BrokerConfig] | None:
    """Start the demo's broker (stopped with ``stack``) and say where it is; None, after one
    line on stderr, when it cannot start."""
    try:
        handle = stack.enter_context(start_broker(kind))
    except Exception as exc:
        print(f"fedmq demo: could not start the broker ({kind}): {exc}", file=sys.stderr)
        return None
    _say_broker(handle)
    return handle, BrokerConfig(host=handle.host, port=handle.port, mqtt5=handle.mqtt5)


def _say_broker(handle: BrokerHandle) -> None:
    if handle.kind == "embedded":
        print(f"broker: embedded amqtt on {handle.address} (MQTT 3.1.1 only; install "
              "mosquitto for MQTT 5 and the production path)")
    else:
        print(f"broker: {handle.kind} on {handle.address}")
