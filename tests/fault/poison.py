"""The ``poison`` drill: the demo federation with poisoned updates (``scripts/faults poison``).

The demo setting: ``--devices`` (20) devices on an IID partition of scikit-learn's digits, the
default 64-128-10 MLP, ``--rounds`` (20) rounds, fp32 updates; the aggregator config is
``fedmq.demo.demo_config`` (so ``limits.max_examples`` is the largest shard) with one change:
some updates are rejected in the ``bitflip`` scenario, so a round must not wait for every
device. Rounds close at a quorum with a short grace (``quorum_rounds``):

- ``min_updates`` = devices // 2 (10 of 20), ``max_updates`` = devices (20): a round closes the
  moment all are in, else ``grace_s`` = 2 s after the quorum;
- ``deadline_s`` = 30.

Every run is in this process: the aggregator (``AggregatorService`` on paho), the devices
(``AgentService.over_mqtt`` with an ``MLPTrainer`` on their shard, as in the demo) and an app that
follows the model topic (``ModelSubscriber``) and scores each published model on the held-out
test split, like the demo. ``run_poison`` starts a Mosquitto (``fedmq/broker_config/dev.conf``
on a free loopback port) for each run. Scenarios, each a full run:

huge
    Devices 0 and 1 are attackers (``Attacker``) that do not train: they answer every round
    announcement with an update of +3e38 in every coordinate (fp32, finite), at the largest
    weight the config allows (``num_examples`` = ``limits.max_examples``).
noise
    The same attackers send Gaussian noise, sigma 10 in every coordinate, at the largest weight.
bitflip
    No attackers: all devices train honestly, but each of their update messages has one random
    bit of its payload flipped with probability 5% (``BitFlipAgent``, seeded), before the
    device's outbox stores it and publishes it.

And a ``clean`` run (all devices honest, nothing flipped) for ``final_accuracy_clean``. A
scenario's ``accuracy_drop`` is clean minus its final accuracy. ``worker_errors`` counts records of
the ``aggregator`` loggers at ERROR or above, or whose message starts with "aggregator worker
error" (the worker's catch-all: something a device sent broke it). Passes when every run (the
clean one included) closes ``rounds`` rounds (published models, ``stats.rounds_completed``)
with ``worker_errors`` = 0, and ``max_accuracy_drop`` <= ``MAX_ACCURACY_DROP`` (0.03).

Each run's JSON also has the aggregator's ``accepted``, ``rejected`` (by reason), ``clipped`` and
``abandoned`` counters, every round's accuracy, ``model_finite`` (every published model), the
attackers' updates sent, and for ``bitflip`` what each flip did to its message
(``flip_effect``); ``setting`` records the rounds config and the attack parameters. A run gives up
after 60 s + 15 s per round (``timed_out``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import queue
import random
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from aggregator.service import AggregatorService
from device_agent.service import AgentService
from device_agent.trainers import MLPTrainer
from fedmq import codec, compression
from fedmq.broker import MosquittoBroker, default_config_dir
from fedmq.chunking import split_update
from fedmq.compression import decode_all
from fedmq.config import AggregatorConfig, BrokerConfig, RoundsConfig
from fedmq.datasets import load_digits_split, partition
from fedmq.demo import demo_config
from fedmq.errors import DecodeError
from fedmq.models import DEFAULT_LAYER_SIZES, init_mlp
from fedmq.subscriber import ModelSubscriber
from fedmq.topics import Topics
from fedmq.transport import PahoTransport
from fedmq.wire import GlobalModel, ModelUpdate, RoundAnnouncement, Tensor

F32 = npt.NDArray[np.float32]

SCENARIOS: tuple[str, ...] = ("huge", "noise", "bitflip")
#: Devices replaced by attackers in ``huge`` and ``noise`` (devices 0 .. ATTACKERS-1).
ATTACKERS = 2
HUGE_VALUE = 3e38
NOISE_SIGMA = 10.0
FLIP_RATE = 0.05
MAX_ACCURACY_DROP = 0.03
#: The rounds config of every run (``min_updates`` is half the devices, ``max_updates`` all).
QUORUM_GRACE_S = 2.0
QUORUM_DEADLINE_S = 30.0


def quorum_rounds(rounds: RoundsConfig, devices: int, max_rounds: int) -> RoundsConfig:
    """The demo's rounds config, but closing at a quorum of half the devices plus a grace."""
    return dataclasses.replace(rounds, min_updates=max(1, devices // 2), max_updates=devices,
                               grace_s=QUORUM_GRACE_S, deadline_s=QUORUM_DEADLINE_S,
                               max_rounds=max_rounds)


def poison_passed(result: dict[str, Any]) -> bool:
    """Every run closed all its rounds without a worker error, and the accuracy held."""
    runs = list(result["scenarios"].values())
    if result.get("clean") is not None:
        runs.append(result["clean"])
    drop = result["max_accuracy_drop"]
    return (all(r["rounds_closed"] == r["rounds_expected"] and r["worker_errors"] == 0
                for r in runs)
            and drop is not None and drop <= MAX_ACCURACY_DROP)


# ------------------------------------------------------------------------ the bad actors


class WorkerErrors(logging.Handler):
    """Counts the ``aggregator`` loggers' errors (attach it to ``logging.getLogger("aggregator")``).
    """

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno >= logging.ERROR or message.startswith("aggregator worker error"):
            self.count += 1
            if len(self.samples) < 5:
                exc = f" ({record.exc_info[1]!r})" if record.exc_info else ""
                self.samples.append(f"{record.name}: {message}{exc}")


@contextlib.contextmanager
def counting_worker_errors() -> Iterator[WorkerErrors]:
    handler = WorkerErrors()
    logger = logging.getLogger("aggregator")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


class Attacker:
    """A device that does not train: it answers each open round announcement (once per run and
    round) with a poisoned fp32 update at ``num_examples`` = ``weight``."""

    def __init__(self, kind: str, federation: str, device_id: str, broker: BrokerConfig, *,
                 shapes: dict[str, tuple[int, ...]], weight: int, seed: int) -> None:
        if kind not in ("huge", "noise"):
            raise ValueError(f"unknown attack {kind!r}")
        self.kind = kind
        self.federation = federation
        self.device_id = device_id
        self.topics = Topics(federation)
        self.shapes = shapes
        self.weight = weight
        self.rng = np.random.default_rng(seed)
        self.transport = PahoTransport(broker, client_id=f"fedmq-attacker-{federation}-"
                                                         f"{device_id}")
        self.sent = 0
        self._answered: set[tuple[int, int]] = set()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.transport.subscribe(self.topics.round, qos=1)
        self.transport.start()
        self._thread = threading.Thread(target=self._work, name=f"attacker-{self.device_id}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.transport.stop()

    def _work(self) -> None:
        while not self._stopping.is_set():
            try:
                msg = self.transport.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if not msg.payload:
                continue
            try:
                ann = codec.decode_as(msg.payload, RoundAnnouncement)
            except DecodeError:
                continue
            if not ann.open or (ann.run, ann.round) in self._answered:
                continue
            self._answered.add((ann.run, ann.round))
            for message in self.updates(ann):
                self.transport.publish(self.topics.update(self.device_id), codec.encode(message),
                                       qos=1)
            self.sent += 1

    def values(self) -> dict[str, F32]:
        if self.kind == "huge":
            return {n: np.full(s, HUGE_VALUE, dtype=np.float32) for n, s in self.shapes.items()}
        return {n: self.rng.normal(0.0, NOISE_SIGMA, size=s).astype(np.float32)
                for n, s in self.shapes.items()}

    def updates(self, ann: RoundAnnouncement) -> list[ModelUpdate]:
        """The poisoned update for ``ann``, in as many messages as ``max_chunk_bytes`` needs."""
        arrays = self.values()

        def encoder(name: str, values: F32) -> Tensor:
            return compression.encode(name, values, "fp32")

        whole = ModelUpdate(
            federation=self.federation, device_id=self.device_id, round=ann.round,
            base_version=ann.base_version, update_id=uuid.uuid4().hex, run=ann.run,
            num_examples=self.weight, metrics={},
            tensors=tuple(compression.encode(n, a, "fp32") for n, a in arrays.items()))
        if ann.max_chunk_bytes:
            return split_update(whole, arrays, encoder, ann.max_chunk_bytes)
        return [whole]


def flip_bit(payload: bytes, rng: random.Random) -> bytes:
    """``payload`` with one bit, chosen by ``rng``, flipped."""
    bit = rng.randrange(len(payload) * 8)
    out = bytearray(payload)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def flip_effect(original: bytes, flipped: bytes) -> str:
    """What a flip did to an update message: "undecodable", "header" (a field other than tensor
    values changed), "value_non_finite", "value_large" (a value now over 1e3 in magnitude) or
    "value_small"."""
    try:
        new = codec.decode_as(flipped, ModelUpdate)
    except DecodeError:
        return "undecodable"
    old = codec.decode_as(original, ModelUpdate)
    if (dataclasses.replace(new, tensors=()) != dataclasses.replace(old, tensors=())
            or len(new.tensors) != len(old.tensors)):
        return "header"
    for a, b in zip(old.tensors, new.tensors, strict=True):
        if dataclasses.replace(a, data=b"") != dataclasses.replace(b, data=b""):
            return "header"
        if bytes(a.data) != bytes(b.data):
            before = np.frombuffer(a.data, dtype="<u4")
            values = np.frombuffer(b.data, dtype="<f4")
            changed = values[np.flatnonzero(np.frombuffer(b.data, dtype="<u4") != before)]
            if not np.isfinite(changed).all():
                return "value_non_finite"
            return "value_large" if float(np.abs(changed).max()) > 1e3 else "value_small"
    return "header"


class BitFlipAgent(AgentService):
    """An honest device whose update messages each get one random payload bit flipped with
    probability ``flip_rate`` before they are stored and published (a corrupting link)."""

    flip_rate: float = 0.0
    flip_rng: random.Random | None = None
    messages: int = 0
    #: What each flip did (``flip_effect``).
    flips: Counter[str] | None = None

    def _send_update(self, update_id: str, messages: list[tuple[str, bytes]]) -> None:
        out = []
        for topic, payload in messages:
            self.messages += 1
            if self.flip_rng is not None and self.flip_rng.random() < self.flip_rate:
                bad = flip_bit(payload, self.flip_rng)
                self.flips = self.flips or Counter()
                self.flips[flip_effect(payload, bad)] += 1
                out.append((topic, bad))
            else:
                out.append((topic, payload))
        super()._send_update(update_id, out)


# ------------------------------------------------------------------------ one run


@dataclasses.dataclass
class DemoData:
    """The demo's digits: training shards and the held-out test split."""

    x_train: F32
    y_train: npt.NDArray[np.int64]
    x_test: F32
    y_test: npt.NDArray[np.int64]
    shards: list[npt.NDArray[np.intp]]

    @classmethod
    def load(cls, devices: int, seed: int) -> DemoData:
        x_train, y_train, x_test, y_test = load_digits_split(seed)
        return cls(x_train, y_train, x_test, y_test, partition(y_train, devices, "iid", seed))


def scenario_config(broker: BrokerConfig, federation: str, data: DemoData, *, seed: int,
                    rounds: int) -> AggregatorConfig:
    """``demo_config`` for this federation, with the quorum rounds config."""
    devices = len(data.shards)
    args = argparse.Namespace(seed=seed, devices=devices, rounds=rounds, epochs=None, lr=None,
                              batch_size=None, codec="fp32", topk_fraction=0.1)
    config = demo_config(args, broker, list(DEFAULT_LAYER_SIZES), [len(s) for s in data.shards])
    return dataclasses.replace(config, federation=federation,
                               rounds=quorum_rounds(config.rounds, devices, rounds))


def _devices(scenario: str, broker: BrokerConfig, data: DemoData, config: AggregatorConfig,
             seed: int) -> tuple[list[Attacker], list[AgentService]]:
    """The run's attackers (devices 0 and 1 in ``huge`` and ``noise``) and honest agents."""
    federation = config.federation
    attacked = scenario in ("huge", "noise")
    shapes = {n: tuple(int(d) for d in a.shape)
              for n, a in init_mlp(config.model.layers, config.model.seed).items()}
    attackers: list[Attacker] = []
    agents: list[AgentService] = []
    for i, idx in enumerate(data.shards):
        device_id = f"device-{i:03d}"
        if attacked and i < ATTACKERS:
            attackers.append(Attacker(scenario, federation, device_id, broker, shapes=shapes,
                                      weight=config.limits.max_examples, seed=seed * 1000 + i))
            continue
        trainer = MLPTrainer(data.x_train[idx], data.y_train[idx], num_classes=10)
        if scenario == "bitflip":
            agent = BitFlipAgent.over_mqtt(federation, device_id, trainer, broker)
            assert isinstance(agent, BitFlipAgent)
            agent.flip_rate = FLIP_RATE
            agent.flip_rng = random.Random(f"bitflip-{seed}-{i}")
        else:
            agent = AgentService.over_mqtt(federation, device_id, trainer, broker)
        agents.append(agent)
    return attackers, agents


@dataclasses.dataclass
class Followed:
    """What the app on the model topic saw: each version's accuracy, in order."""

    accuracies: list[float] = dataclasses.field(default_factory=list)
    finite: bool = True
    timed_out: bool = False


def _follow(scenario: str, watcher: ModelSubscriber, models: queue.Queue[GlobalModel],
            scorer: MLPTrainer, *, rounds: int, timeout_s: float,
            progress: Callable[[str], None]) -> Followed:
    """Score versions 1..``rounds`` as they are published, like the demo; one line each."""
    seen = Followed()
    deadline = time.monotonic() + timeout_s
    round_started = time.monotonic()
    while len(seen.accuracies) < rounds:
        if time.monotonic() > deadline:
            seen.timed_out = True
            break
        watcher.poll(0.2)
        while not models.empty():
            model = models.get_nowait()
            if model.version != len(seen.accuracies) + 1:
                continue  # version 0, or (never expected) a version out of order
            weights = decode_all(model.tensors)
            seen.finite = seen.finite and all(bool(np.isfinite(w).all())
                                              for w in weights.values())
            with np.errstate(all="ignore"):
                accuracy = scorer.evaluate(weights).accuracy
            assert accuracy is not None  # a classifier's evaluation has one
            seen.accuracies.append(accuracy)
            now = time.monotonic()
            progress(f"poison {scenario:<8s} round {model.version:3d}/{rounds}  "
                     f"participants {int(model.metrics.get('participants', 0)):3d}  "
                     f"accuracy {accuracy:.4f}  ({now - round_started:.2f} s)")
            round_started = now
    return seen


def run_scenario(scenario: str, broker: BrokerConfig, data: DemoData, *, seed: int,
                 rounds: int, federation: str, timeout_s: float,
                 progress: Callable[[str], None]) -> dict[str, Any]:
    """One full run: ``scenario`` is "clean", "huge", "noise" or "bitflip"."""
    started = time.monotonic()
    config = scenario_config(broker, federation, data, seed=seed, rounds=rounds)
    scorer = MLPTrainer(data.x_test, data.y_test, num_classes=10)
    models: queue.Queue[GlobalModel] = queue.Queue()
    with counting_worker_errors() as errors, contextlib.ExitStack() as stack:
        # The app subscribes before anything is published, like the demo's.
        watcher = ModelSubscriber(broker, federation, on_model=models.put).start()
        stack.callback(watcher.stop)
        agg = AggregatorService(config)
        attackers, agents = _devices(scenario, broker, data, config, seed)
        for attacker in attackers:
            attacker.start()
            stack.callback(attacker.stop)
        for agent in agents:
            agent.start()
            stack.callback(agent.stop)
        agg.start()
        stack.callback(agg.stop)
        seen = _follow(scenario, watcher, models, scorer, rounds=rounds, timeout_s=timeout_s,
                       progress=progress)
    # Everything is stopped: the aggregator's counters are final.
    result: dict[str, Any] = {
        "rounds_closed": agg.stats.rounds_completed,
        "rounds_expected": rounds,
        "worker_errors": errors.count,
        "final_accuracy": seen.accuracies[-1] if seen.accuracies else None,
        "accepted": agg.stats.accepted,
        "rejected": dict(sorted(agg.stats.rejected.items())),
        "clipped": agg.stats.clipped,
        "abandoned": dict(sorted(agg.stats.abandoned.items())),
        "model_finite": seen.finite,
        "accuracies": [round(a, 4) for a in seen.accuracies],
        "timed_out": seen.timed_out,
        "wall_s": round(time.monotonic() - started, 1),
    }
    if attackers:
        result["attackers"] = [a.device_id for a in attackers]
        result["attack_updates_sent"] = sum(a.sent for a in attackers)
    if scenario == "bitflip":
        flippers = [a for a in agents if isinstance(a, BitFlipAgent)]
        result["update_messages"] = sum(a.messages for a in flippers)
        effects: Counter[str] = sum((a.flips or Counter() for a in flippers), Counter())
        result["flipped_messages"] = effects.total()
        result["flip_effects"] = dict(sorted(effects.items()))
    if errors.samples:
        result["worker_error_samples"] = errors.samples
    return result


# ------------------------------------------------------------------------ the drill


def _say(line: str, stream: TextIO = sys.stderr) -> None:
    print(line, file=stream, flush=True)


@contextlib.contextmanager
def _broker_for(broker: BrokerConfig | None) -> Iterator[BrokerConfig]:
    """``broker``, or a fresh Mosquitto (dev.conf, a free loopback port) for this run only."""
    if broker is not None:
        yield broker
        return
    with MosquittoBroker(default_config_dir() / "dev.conf") as mosquitto:
        yield BrokerConfig(host=mosquitto.host, port=mosquitto.port, reconnect_min_s=0.1,
                           reconnect_max_s=1.0)


def run_poison(*, seed: int = 0, rounds: int = 20, devices: int = 20,
               scenarios: Sequence[str] = SCENARIOS, clean: bool = True,
               broker: BrokerConfig | None = None, timeout_s: float | None = None,
               progress: Callable[[str], None] = _say) -> dict[str, Any]:
    """The drill's result (see the module docstring); ``clean`` False skips the clean run.

    Without ``broker``, each run gets its own Mosquitto; with one, each run its own federation
    (``poison-{scenario}-{seed}``) on it.
    """
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise ValueError(f"unknown scenarios {sorted(unknown)}; known: {SCENARIOS}")
    if devices <= ATTACKERS or rounds < 1:
        raise ValueError(f"need more than {ATTACKERS} devices and at least one round")
    data = DemoData.load(devices, seed)
    limit = timeout_s if timeout_s is not None else 60.0 + 15.0 * rounds
    runs = (["clean"] if clean else []) + list(scenarios)
    results: dict[str, dict[str, Any]] = {}
    for name in runs:
        with _broker_for(broker) as cfg:
            results[name] = run_scenario(name, cfg, data, seed=seed, rounds=rounds,
                                         federation=f"poison-{name}-{seed}", timeout_s=limit,
                                         progress=progress)
        r = results[name]
        progress(f"poison {name:<8s} done: {r['rounds_closed']}/{rounds} rounds, final accuracy "
                 f"{r['final_accuracy']}, {r['worker_errors']} worker errors, rejected "
                 f"{r['rejected']}, {r['wall_s']} s")
    clean_run = results.pop("clean", None)
    clean_acc = clean_run["final_accuracy"] if clean_run is not None else None
    drops: list[float | None] = []
    for r in results.values():
        r["final_accuracy_clean"] = clean_acc
        drop = (round(clean_acc - r["final_accuracy"], 4)
                if clean_acc is not None and r["final_accuracy"] is not None else None)
        r["accuracy_drop"] = drop
        drops.append(drop)
    max_drop = (max(d for d in drops if d is not None)
                if drops and all(d is not None for d in drops) else None)
    rc = quorum_rounds(RoundsConfig(), devices, rounds)
    result: dict[str, Any] = {
        "setting": {
            "devices": devices, "rounds": rounds, "seed": seed, "partition": "iid",
            "layers": list(DEFAULT_LAYER_SIZES), "codec": "fp32",
            "min_updates": rc.min_updates, "max_updates": rc.max_updates,
            "grace_s": rc.grace_s, "deadline_s": rc.deadline_s,
            "max_examples": max(len(s) for s in data.shards),
            "attackers": ATTACKERS, "huge_value": HUGE_VALUE, "noise_sigma": NOISE_SIGMA,
            "flip_rate": FLIP_RATE, "max_accuracy_drop_allowed": MAX_ACCURACY_DROP,
        },
        "scenarios": results,
        "clean": clean_run,
        "final_accuracy_clean": clean_acc,
        "max_accuracy_drop": max_drop,
    }
    result["passed"] = poison_passed(result)
    return result
