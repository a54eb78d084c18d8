"""Fault drills against real processes: Mosquitto, the aggregator and device agents we kill.

Used by the short fault tests in the suite and by ``scripts/faults`` for long runs.

Two kinds of drill:

- ``Drill`` (``kill9_aggregator``, ``soak``): the aggregator as a separate process and a *driver*
  in this process that publishes every device's update itself. Updates are deterministic and
  exactly summable (small multiples of 2**-10 with integer weights), so the final model of a run
  with faults must equal the fault-free reference bit for bit.
- ``AgentDrill`` (``restart_broker``, ``drop_devices``): the aggregator *and every device* are
  separate processes. A device is a real ``AgentService`` with an on-disk ``Outbox`` (this file's
  ``device`` entry point, ``python faultkit.py device SPEC.json``); only its training is scripted
  (``ScriptedTrainer``: the base model plus a deterministic delta on a grid, after a seeded
  pause). It journals what happens to its updates (``JournalingAgent``), which is how the drill
  knows what the broker acknowledged.

``PersistentMosquitto`` runs Mosquitto with ``PERSISTENCE_OPTIONS`` in a directory of the test's;
``AckWindowProbe`` measures whether a kill -9 of it can lose a message it has acknowledged.

Run as a script, this file is the device process (``device_main``).
"""

from __future__ import annotations

import heapq
import importlib
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from aggregator.history import ModelHistory
from aggregator.robust import MAX_BOOTSTRAP
from device_agent.outbox import Outbox
from device_agent.service import AgentService
from device_agent.trainers import EvalResult, FitResult, TrainConfig
from fedmq import codec, compression
from fedmq.broker import MosquittoBroker, default_config_dir
from fedmq.config import BrokerConfig, StrategyConfig
from fedmq.models import Weights, init_mlp
from fedmq.subscriber import ModelSubscriber
from fedmq.topics import Topics
from fedmq.transport import PahoTransport
from fedmq.wire import ModelUpdate, RoundAnnouncement, RoundSummary

ROOT = Path(__file__).resolve().parents[2]
# The kernels' numpy references (tests/unit/naive.py) and the server optimizers'
# (tests/unit/server_opt_reference.py): one copy, for the drills' references too.
sys.path.insert(0, str(ROOT / "tests" / "unit"))
naive = importlib.import_module("naive")
server_opt_reference = importlib.import_module("server_opt_reference")
F32 = npt.NDArray[np.float32]


def broker_config(broker: MosquittoBroker) -> BrokerConfig:
    """How the drill's clients reach ``broker`` (quick reconnects)."""
    return BrokerConfig(host=broker.host, port=broker.port, reconnect_min_s=0.1,
                        reconnect_max_s=1.0)
LAYERS = [6, 4, 3]
SEED = 2


# ------------------------------------------------------------------------ a persistent broker

#: What makes a restarted Mosquitto remember as much as it can: save the in-memory database
#: after every change it counts. Mosquitto 2.0.11 counts a message *queued* for a client (one
#: that is offline, or has ``max_inflight_messages`` unacknowledged), a retained message and a
#: subscription change, and saves (the whole database, written and fsynced) at the end of the
#: event-loop turn that made the change: after it has sent the PUBACK. A kill -9 within about a
#: millisecond of the PUBACK therefore loses a queued message (``AckWindowProbe``). A message it
#: hands straight to a connected subscriber is not counted (not saved): it is already on its way
#: to the subscriber.
PERSISTENCE_OPTIONS = ("persistence true", "autosave_interval 1", "autosave_on_changes true")


def persistent_template(directory: Path, base: Path | None = None) -> Path:
    """``fedmq/broker_config/dev.conf`` (or ``base``) with ``PERSISTENCE_OPTIONS``, written to
    ``directory``; ``persistence_location`` is added by the renderer (the broker's work dir)."""
    base = base or default_config_dir() / "dev.conf"
    replaced = {option.split()[0] for option in PERSISTENCE_OPTIONS}
    lines = [line for line in base.read_text(encoding="utf-8").splitlines()
             if not line.split() or line.split()[0] not in replaced]
    path = directory / "persistent.conf"
    path.write_text("\n".join([*lines, *PERSISTENCE_OPTIONS]) + "\n", encoding="utf-8")
    return path


class PersistentMosquitto(MosquittoBroker):
    """A Mosquitto with persistence on whose work dir is ``directory`` (e.g. in the test's tmp
    dir): the rendered config, the log and ``mosquitto.db`` (``persistence_location``) live there.

    ``kill()`` then ``start()`` brings it back on the same port from its last save.
    """

    def __init__(self, directory: Path, binary: str | None = None, *,
                 keep_dir: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.keep_dir = keep_dir
        super().__init__(persistent_template(directory), binary=binary)

    def close(self) -> None:
        """Stop; delete ``directory`` unless ``keep_dir`` (to read the log afterwards)."""
        if self.keep_dir:
            self.stop()
        else:
            super().close()

    def _ensure_workdir(self) -> Path:
        # MosquittoBroker renders its work dir as persistence_location: make that ours.
        self._workdir = self.directory
        return self.directory

    @property
    def db_path(self) -> Path:
        return self.directory / "mosquitto.db"


def _raw_client(client_id: str, port: int, *, durable: bool,
                on_message: Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None] | None = None,
                ) -> mqtt.Client:
    """A bare paho client, connected, network thread running (``durable``: a persistent
    session that outlives the connection; ``on_message`` is set before it connects, so a
    queued message delivered at once is not missed)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    if on_message is not None:
        client.on_message = on_message
    client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]  # paho sleeps on floats
    connected = threading.Event()
    client.on_connect = lambda *_: connected.set()
    properties = None
    if durable:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 600
    client.connect("127.0.0.1", port, clean_start=not durable, properties=properties)
    client.loop_start()
    if not connected.wait(10):
        raise RuntimeError(f"{client_id} could not connect")
    return client


class AckWindowProbe:
    """Can a kill -9 of a persisting Mosquitto lose a message it has acknowledged?

    A publisher sends one QoS 1 message; ``delay`` ms after its PUBACK arrives (from paho's
    ``on_publish`` callback, on the network thread: at delay 0 the SIGKILL goes out within
    about 0.1 ms of the PUBACK) Mosquitto is SIGKILLed and restarted from its save. Then the
    message must reach a durable subscriber (persistent session), which was either offline
    (the message was queued for it: the aggregator while it restarts or before it reconnects)
    or online (the aggregator running). ``run`` returns the lost counts per case.
    """

    def __init__(self, directory: Path, binary: str | None = None) -> None:
        self.broker = PersistentMosquitto(directory, binary=binary)
        self.sub_id = f"probe-sub-{uuid.uuid4().hex[:6]}"
        self.got: set[str] = set()
        self.lock = threading.Lock()
        self.kill_delay_s = 0.0

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.add(msg.payload.decode())

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, *_: Any) -> None:
        if self.kill_delay_s:
            time.sleep(self.kill_delay_s)
        pid = self.broker.pid
        if pid is not None:
            os.kill(pid, signal.SIGKILL)

    def _subscriber(self) -> mqtt.Client:
        return _raw_client(self.sub_id, self.broker.port, durable=True,
                           on_message=self._on_message)

    def _arrived(self, tag: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if tag in self.got:
                    return True
            time.sleep(0.01)
        return False

    def _kill_after_puback(self, tag: str) -> None:
        pub = _raw_client(f"probe-pub-{uuid.uuid4().hex[:6]}", self.broker.port, durable=False)
        pub.on_publish = self._on_publish
        pub.publish("probe/t", tag.encode(), qos=1)
        while self.broker.running:
            time.sleep(0.001)
        pub.loop_stop()
        self.broker.kill()  # reaps the process
        self.broker.start()

    def run(self, trials: int, delays_ms: Sequence[float]) -> dict[str, Any]:
        out: dict[str, Any] = {"trials_per_case": trials}
        self.broker.start()
        try:
            sub = self._subscriber()
            sub.subscribe("probe/t", qos=1)
            time.sleep(1.2)  # the subscription is saved
            sub.disconnect()
            sub.loop_stop()
            for delay in delays_ms:  # the subscriber is offline: the message is queued
                self.kill_delay_s = delay / 1000
                lost = 0
                for i in range(trials):
                    tag = f"offline-{delay}-{i}"
                    self._kill_after_puback(tag)
                    sub = self._subscriber()
                    lost += not self._arrived(tag, 2.0)
                    sub.disconnect()
                    sub.loop_stop()
                out[f"lost_offline_subscriber_kill_{delay:g}ms_after_puback"] = lost
            sub = self._subscriber()  # online from now on (it reconnects after each kill)
            for delay in delays_ms:
                self.kill_delay_s = delay / 1000
                lost = 0
                for i in range(trials):
                    tag = f"online-{delay}-{i}"
                    while not sub.is_connected():
                        time.sleep(0.01)
                    self._kill_after_puback(tag)
                    lost += not self._arrived(tag, 5.0)
                out[f"lost_online_subscriber_kill_{delay:g}ms_after_puback"] = lost
            sub.disconnect()
            sub.loop_stop()
        finally:
            self.broker.close()
        return out


#: The norm bound's defaults (docs/robustness.md), restated for the references.
CLIP_MULTIPLIER = 3.0
MAX_NORM = 10_000.0
ADAPT_RATE = 0.2


def _aggregator_toml(federation: str, broker: BrokerConfig, state: Path, model: str, *,
                     min_updates: int, max_updates: int, deadline_s: float, grace_s: float,
                     max_rounds: int) -> str:
    return f'federation = "{federation}"\n' + textwrap.dedent(f"""
        [broker]
        host = "{broker.host}"
        port = {broker.port}
        reconnect_min_s = 0.1
        reconnect_max_s = 1.0
        [model]
        {model}
        [rounds]
        min_updates = {min_updates}
        max_updates = {max_updates}
        deadline_s = {deadline_s}
        grace_s = {grace_s}
        max_rounds = {max_rounds}
        [durability]
        state_dir = "{state}"
        session_expiry_s = 600
        """)


def _rss_mb(proc: subprocess.Popen[str]) -> float:
    return float(psutil.Process(proc.pid).memory_info().rss) / 2**20


# ------------------------------------------------------------------------ driver drills


@dataclass
class Drill:
    """One run: the aggregator as a separate process, devices driven from here."""

    broker: BrokerConfig
    state_dir: Path
    devices: int = 4
    rounds: int = 3
    layers: list[int] = field(default_factory=lambda: list(LAYERS))
    #: Rounds after which the aggregator stops by itself (None: ``rounds``; 0: never).
    max_rounds: int | None = None
    #: Publish every device's update as soon as a round opens (else one per loop turn).
    burst: bool = False
    #: ``[strategy] name``, with its default settings (docs/learning.md).
    strategy: str = "fedavg"
    federation: str = field(default_factory=lambda: f"fault-{uuid.uuid4().hex[:8]}")
    kills: int = 0
    sent: dict[str, int] = field(default_factory=dict)  # update id -> round
    proc: subprocess.Popen[str] | None = None
    _announcement: RoundAnnouncement | None = None

    def __post_init__(self) -> None:
        self.topics = Topics(self.federation)
        self.config = self.state_dir / "aggregator.toml"
        self.log = self.state_dir / "aggregator.log"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        max_rounds = self.rounds if self.max_rounds is None else self.max_rounds
        self.config.write_text(_aggregator_toml(
            self.federation, self.broker, self.state_dir / "state",
            f"layers = {self.layers}\nseed = {SEED}", min_updates=self.devices,
            max_updates=self.devices, deadline_s=300, grace_s=5.0, max_rounds=max_rounds)
            + self._robust_toml() + f'[strategy]\nname = "{self.strategy}"\n')

    def _initial_norm(self) -> float | None:
        # Up to MAX_BOOTSTRAP devices the estimate starts from all of round 1 (any arrival
        # order gives the same median); above, from the first arrivals, which the reference
        # cannot know: such drills give the estimate its starting value instead.
        return None if self.devices <= MAX_BOOTSTRAP else 0.25

    def _robust_toml(self) -> str:
        start = self._initial_norm()
        return "" if start is None else f"[robust]\ninitial_norm = {start}\n"

    def delta(self, round_: int, device: int) -> dict[str, F32]:
        rng = np.random.default_rng(round_ * 1000 + device)
        # Device 0 sends a 20x update every odd round: over the norm bound, so it is clipped,
        # and the bound's adaptive state must survive every kill to give the same model.
        big = 20 if device == 0 and round_ % 2 else 1
        return {k: (rng.integers(-64, 64, v.shape) * big / 1024).astype(np.float32)
                for k, v in init_mlp(self.layers, SEED).items()}

    def update_id(self, round_: int, device: int) -> str:
        return f"r{round_}-d{device}"

    def reference(self) -> dict[str, F32]:
        """The fault-free model after all rounds (exact arithmetic, any order), with every
        update clipped by the default adaptive norm bound (written out here from
        docs/robustness.md: every device is in every round, so the estimate starts as the
        median of round 1's norms and moves once per round), each round's mean delta applied
        by the strategy's numpy reference (``server_opt_reference``)."""
        model = init_mlp(self.layers, SEED)
        optimizer = server_opt_reference.ServerOptimizer(
            self.strategy, **StrategyConfig(name=self.strategy).settings())  # type: ignore[arg-type]
        w = [d + 1 for d in range(self.devices)]
        estimate = self._initial_norm()
        for r in range(1, self.rounds + 1):
            deltas = [self.delta(r, d) for d in range(self.devices)]
            # Per tensor in the kernels' order (naive.lane_sq_norm), summed like the admission's.
            norms = [math.sqrt(sum(naive.lane_sq_norm(a) for a in delta.values()))
                     for delta in deltas]
            # Every device in every round: round 1's norms start the estimate (and, being the
            # bootstrap, do not move it); each later round moves it once.
            first = estimate is None
            if estimate is None:
                estimate = float(np.median(norms))
            bound = min(CLIP_MULTIPLIER * estimate, MAX_NORM)
            scales = [1.0 if n <= bound else bound / n for n in norms]
            mean = {k: sum(deltas[d][k].astype(np.float64) * (w[d] * scales[d])
                           for d in range(self.devices)) / sum(w) for k in model}
            model = {k: v.astype(np.float32) for k, v in optimizer.step(model, mean).items()}
            if not first:
                below = sum(n <= estimate for n in norms) / len(norms)
                estimate *= math.exp(-ADAPT_RATE * (below - 0.5))
        return model

    def start_aggregator(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with self.log.open("a") as out:  # a file, not a pipe: nobody has to drain it
            self.proc = subprocess.Popen(
                aggregator_command(self.config), env=env,
                stdout=out, stderr=subprocess.STDOUT, text=True)

    def kill_aggregator(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.kills += 1

    def run(self, kills: int, rng: random.Random, timeout: float = 120.0) -> dict[str, float]:
        """Run all rounds, SIGKILLing the aggregator ``kills`` times; return the drill keys."""
        driver = PahoTransport(self.broker, client_id=f"drv-{uuid.uuid4().hex[:8]}")
        driver.subscribe(self.topics.round)
        driver.start()
        watcher = ModelSubscriber(self.broker, self.federation, summaries=True).start()
        self.start_aggregator()
        end = time.monotonic() + timeout
        total = self.devices * self.rounds
        # Kill after random numbers of sent updates (and a random moment after that one), so
        # kills land before, during and after logging, folding, acks and round closes.
        schedule = sorted(rng.choices(range(1, total), k=kills))
        try:
            while True:
                if time.monotonic() > end:
                    raise TimeoutError(f"drill did not finish in {timeout} s")
                self._answer_announcements(driver)
                assert self.proc is not None
                if self.proc.poll() is not None:
                    if self.proc.returncode == 0:
                        break
                    raise RuntimeError(f"aggregator exited {self.proc.returncode}: "
                                       f"{self.log.read_text()[-3000:]}")
                if self.kills < kills and len(self.sent) >= schedule[self.kills]:
                    time.sleep(rng.uniform(0.0, 0.05))
                    self.kill_aggregator()
                    time.sleep(rng.uniform(0.0, 0.3))
                    self.start_aggregator()
                time.sleep(0.01)
            latest = watcher.wait_for_version(self.rounds, timeout=10)
            deadline = time.monotonic() + 5
            while len(watcher.summaries) < self.rounds and time.monotonic() < deadline:
                watcher.poll(0.1)
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            driver.stop()
            watcher.stop()
        assert latest is not None
        return self._account(ModelSubscriber.weights(latest), watcher.summaries)

    def soak(self, sample_round: int = 5, timeout: float = 1800.0) -> dict[str, Any]:
        """Run ``rounds`` fault-free rounds; measure the aggregator's RSS (psutil) when the
        summary of ``sample_round`` arrives and when that of the last round does.

        Needs ``max_rounds=0`` so the aggregator is still alive to be measured after the last
        round; it is stopped with SIGTERM afterwards.
        """
        if self.max_rounds != 0:
            raise ValueError("soak needs max_rounds=0: the aggregator must outlive the last round")
        if not 1 <= sample_round < self.rounds:
            raise ValueError(f"sample_round must be in 1..{self.rounds - 1}")
        driver = PahoTransport(self.broker, client_id=f"drv-{uuid.uuid4().hex[:8]}")
        driver.subscribe(self.topics.round)
        driver.start()
        watcher = ModelSubscriber(self.broker, self.federation, summaries=True).start()
        t0 = time.monotonic()
        self.start_aggregator()
        assert self.proc is not None
        rss: dict[int, float] = {}
        try:
            while self.rounds not in watcher.summaries:
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"soak did not finish in {timeout} s "
                                       f"({len(watcher.summaries)} rounds)")
                if self.proc.poll() is not None:
                    raise RuntimeError(f"aggregator exited {self.proc.returncode}: "
                                       f"{self.log.read_text()[-3000:]}")
                self._answer_announcements(driver)
                watcher.poll(0.002)
                for version in sorted(set(watcher.summaries) - set(rss)):
                    rss[version] = _rss_mb(self.proc)  # sampled as each round closes
            seconds = time.monotonic() - t0
            latest = watcher.wait_for_version(self.rounds, timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            driver.stop()
            watcher.stop()
        assert latest is not None
        # The aggregator went on to round rounds + 1; only rounds 1..rounds are ours.
        summaries = {v: s for v, s in watcher.summaries.items() if s.round <= self.rounds}
        history = ModelHistory(self.state_dir / "state" / "models", keep=10)
        final = compression.decode_all(history.load(self.rounds).tensors)
        result = self._account(final, summaries)
        start, end = rss[sample_round], rss[self.rounds]
        return {
            **result,
            "devices": self.devices,
            "parameters": sum(int(np.prod(v.shape)) for v in final.values()),
            f"rss_after_round{sample_round}_mb": round(start, 2),
            "rss_end_mb": round(end, 2),
            "rss_growth_ratio": round(end / start, 4),
            "rss_max_mb": round(max(rss.values()), 2),
            "rss_mb_every_10_rounds": {str(v): round(m, 2) for v, m in sorted(rss.items())
                                       if v % 10 == 0 or v == 1},
            "seconds": round(seconds, 1),
            "rounds_per_s": round(self.rounds / seconds, 2),
        }

    def _answer_announcements(self, driver: PahoTransport) -> None:
        """Send updates for the newest open round: one per call, or all of them with ``burst``
        (devices trickle in, or come all at once)."""
        while not driver.inbox.empty():
            msg = driver.inbox.get_nowait()
            ann = codec.decode(msg.payload) if msg.payload else None
            if isinstance(ann, RoundAnnouncement):
                self._announcement = ann
        ann = self._announcement
        if ann is not None and ann.open and ann.round <= self.rounds:
            for d in range(self.devices):
                uid = self.update_id(ann.round, d)
                if uid in self.sent:
                    continue  # already sent: the broker holds it for the aggregator
                u = ModelUpdate(federation=self.federation, device_id=f"d{d}", round=ann.round,
                                base_version=ann.base_version, update_id=uid,
                                num_examples=d + 1,
                                tensors=compression.encode_all(self.delta(ann.round, d)))
                driver.publish(self.topics.update(f"d{d}"), codec.encode(u), qos=1)
                self.sent[uid] = ann.round
                if not self.burst:
                    return

    def _account(self, final: dict[str, F32],
                 summaries: dict[int, RoundSummary]) -> dict[str, float]:
        folded = [uid for s in summaries.values() for _, uid in s.accepted]
        reference = self.reference()
        return {
            "sent": len(self.sent),
            "folded": len(folded),
            "lost": len(set(self.sent) - set(folded)),
            "double_counted": len(folded) - len(set(folded)),
            "max_abs_diff_vs_reference": max(
                float(np.abs(final[k].astype(np.float64) - reference[k]).max())
                for k in reference),
            "kills": self.kills,
            "rounds": len(summaries),
        }


# ------------------------------------------------------------------------ scripted devices


def grid_unit(weights: Sequence[int], min_updates: int, max_updates: int) -> int:
    """The least common multiple of every total weight a round may close with (any
    ``min_updates``..``max_updates`` of the devices)."""
    unit = 1
    for k in range(min_updates, max_updates + 1):
        for combo in itertools.combinations(weights, k):
            unit = math.lcm(unit, sum(combo))
    return unit


def grid_delta(round_: int, device: int, unit: int, name: str,
               shape: tuple[int, ...]) -> F32:
    """Device ``device``'s scripted update of tensor ``name`` in round ``round_``.

    Values are multiples of ``unit`` * 2**-10, so a weighted mean over any set of devices a
    round may close with (the total weight divides ``unit``) is a multiple of 2**-10, as is
    every model of the run when the initial one is (``AgentDrill.initial_model``): every sum,
    mean and difference on either side is exact, in float32 and float64 alike.
    """
    rng = np.random.default_rng([round_, device, zlib.crc32(name.encode())])
    return (rng.integers(-2, 3, shape) * (unit / 1024)).astype(np.float32)


class ScriptedTrainer:
    """Deterministic "training": the base model plus ``grid_delta(round, index)``, returned
    after a pause drawn from ``delay`` (seeded by device and round), with weight ``weight``."""

    def __init__(self, index: int, weight: int, unit: int, delay: tuple[float, float],
                 seed: int) -> None:
        self.index = index
        self.weight = weight
        self.unit = unit
        self.delay = delay
        self.seed = seed

    def fit(self, weights: Weights, config: TrainConfig, round_seed: int) -> FitResult:
        pause = random.Random(f"{self.seed}/{self.index}/{round_seed}").uniform(*self.delay)
        time.sleep(pause)
        return FitResult({k: v + grid_delta(round_seed, self.index, self.unit, k, v.shape)
                          for k, v in weights.items()}, self.weight)

    def evaluate(self, weights: Weights) -> EvalResult:
        return EvalResult(0.0, 0.0, self.weight)


class JournalingAgent(AgentService):
    """An ``AgentService`` that journals its updates, one JSON line each, flushed at once (a
    SIGKILL loses nothing written): ``sent`` when an update is stored in the outbox (before it
    is published), ``acked`` when the broker has acknowledged it (before the outbox forgets it).
    Updates are single messages here (small model), so a message's ack is its update's."""

    journal: IO[str] | None = None

    def _record(self, event: str, update_id: str, round_: int) -> None:
        if self.journal is not None:
            self.journal.write(json.dumps({"ev": event, "uid": update_id, "round": round_,
                                           "device": self.device_id, "t": time.time()}) + "\n")
            self.journal.flush()

    def _send_update(self, update_id: str, messages: list[tuple[str, bytes]]) -> None:
        self._record("sent", update_id, codec.decode_as(messages[0][1], ModelUpdate).round)
        super()._send_update(update_id, messages)

    def _sweep(self) -> None:
        # Journal before the outbox forgets (a SIGKILL in between then means a resend, never
        # an acknowledged update missing from the journal) ...
        recorded = set()
        for key, delivery in list(self._deliveries.items()):
            group = self.outbox.group_of(key)
            if group is not None and key in self.outbox and delivery.done():
                self._record("acked", group, -1)
                recorded.add(group)
        before = {self.outbox.group_of(k) for k in self._deliveries if k in self.outbox}
        super()._sweep()
        # ... and catch the PUBACKs that arrived between that check and the sweep's own.
        after = {self.outbox.group_of(k) for k in self.outbox.pending_keys()}
        for group in before - after - recorded:
            if group is not None:
                self._record("acked", group, -1)


def device_main(spec_path: Path) -> int:
    """One device process: a ``JournalingAgent`` with a ``ScriptedTrainer`` and an on-disk
    outbox in the spec's ``state_dir`` (so a restarted process resends what was left)."""
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    broker = BrokerConfig(host=spec["host"], port=spec["port"], keepalive=spec["keepalive"],
                          reconnect_min_s=0.1, reconnect_max_s=1.0)
    trainer = ScriptedTrainer(spec["index"], spec["weight"], spec["unit"],
                              (spec["delay"][0], spec["delay"][1]), spec["seed"])
    outbox = Outbox(Path(spec["state_dir"]) / "outbox", 64 << 20, 1000)
    service = JournalingAgent.over_mqtt(spec["federation"], spec["device_id"], trainer, broker,
                                        outbox=outbox)
    assert isinstance(service, JournalingAgent)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with open(spec["journal"], "a", encoding="utf-8") as journal:
        service.journal = journal
        service.start()
        while not stop.wait(0.2):
            pass
        service.stop()
    return 0


# ------------------------------------------------------------------------ agent drills


class Journals:
    """Reads the devices' journals as they grow (whole lines only)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self._offsets = dict.fromkeys(paths, 0)
        self.sent: dict[str, tuple[str, int]] = {}  # update id -> (device, round)
        self.acked: dict[str, float] = {}  # update id -> when the device saw the PUBACK

    def poll(self) -> None:
        for path, offset in list(self._offsets.items()):
            try:
                with path.open("rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except FileNotFoundError:
                continue
            end = data.rfind(b"\n") + 1
            for line in data[:end].splitlines():
                ev = json.loads(line)
                if ev["ev"] == "sent":
                    self.sent[ev["uid"]] = (ev["device"], ev["round"])
                elif ev["ev"] == "acked":
                    self.acked.setdefault(ev["uid"], ev["t"])
            self._offsets[path] = offset + end


_REJECTED = re.compile(r"rejected update '([^']*)' from (\S+): (\w+)")


# The aggregator logs each rejection at DEBUG (INFO has a summary per interval); the drills read
# the single lines, so its service logger runs at DEBUG (not the root: numba's would flood it).
_AGGREGATOR_MAIN = ("import logging, sys; from fedmq.cli import main; "
                    "logging.getLogger('aggregator.service').setLevel(logging.DEBUG); "
                    "sys.exit(main(['aggregator', *sys.argv[1:]]))")


def aggregator_command(config: Path) -> list[str]:
    """``python -m aggregator --config CONFIG``, with every rejection logged."""
    return [sys.executable, "-c", _AGGREGATOR_MAIN, "--config", str(config)]


def verdicts(log: Path) -> dict[str, list[str]]:
    """Update id -> the reasons the aggregator rejected it for, once per rejection (its INFO
    log lines)."""
    out: dict[str, list[str]] = {}
    for m in _REJECTED.finditer(log.read_text(encoding="utf-8", errors="replace")):
        out.setdefault(m.group(1), []).append(m.group(3))
    return out


def round_problems(summaries: Sequence[RoundSummary], rounds: int, min_updates: int,
                   max_updates: int) -> list[str]:
    """What breaks the documented rules (docs/rounds.md) in rounds 1..``rounds``: each
    closes once, by ``max_updates`` with exactly ``max_updates`` updates, or by grace or
    deadline with at least ``min_updates`` (below quorum a round is extended, never closed),
    one update per device, participants = accepted updates, version = round (nothing
    abandoned)."""
    problems = []
    got = sorted(s.round for s in summaries)
    if got != list(range(1, rounds + 1)):
        problems.append(f"rounds closed {got}, expected 1..{rounds}")
    for s in summaries:
        n = len(s.accepted)
        if s.closed_by == "max_updates":
            ok = n == max_updates
        elif s.closed_by in ("grace", "deadline"):
            ok = min_updates <= n < max_updates
        else:
            ok = False
        if not ok:
            problems.append(f"round {s.round} closed by {s.closed_by} with {n} updates")
        if s.participants != n:
            problems.append(f"round {s.round}: {s.participants} participants, {n} accepted")
        if len({d for d, _ in s.accepted}) != n:
            problems.append(f"round {s.round}: a device counted twice")
        if s.version != s.round:
            problems.append(f"round {s.round} produced version {s.version}")
    return problems


@dataclass
class DeviceProc:
    """One device process (restarted as a new process, with the same outbox, when it returns)."""

    index: int
    device_id: str
    spec: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    frozen: bool = False
    away: bool = False


@dataclass
class AgentDrill:
    """The aggregator and ``devices`` device agents, each its own process, over a real broker.

    Every device trains for every round (``ScriptedTrainer``), with weight ``weights[i]``
    (default ``i + 1``). The aggregator runs with ``max_rounds = 0`` and is stopped once round
    ``rounds`` has closed, the devices are stopped and what they sent has been handled: a late
    update for round ``rounds`` then still gets the aggregator's verdict (``stale``). The model
    checked is version ``rounds`` from the aggregator's history.

    Accounting (``account``), per update id, from the device journals, the round summaries and
    the aggregator's log (``rejected update 'ID' from DEVICE: REASON``):

    - ``sent``: updates the devices made (stored in their outbox); ``acked``: those the broker
      acknowledged (PUBACK); ``unacked``: sent but never acknowledged by the end;
    - ``folded``: entries in the summaries of rounds 1..``rounds``; ``double_counted``: an
      update id in more than one entry, or a device counted twice in a round;
      ``duplicates_ignored``: second copies of folded updates (broker redeliveries, outbox
      resends) the aggregator rejected (``duplicate``, ``stale``);
    - ``rejected_stale``: acknowledged, not folded, rejected as ``stale``/``round_closed``: it
      reached the aggregator after its round had closed, which is not a loss (the device trains
      again on the next announcement);
    - ``rejected_duplicate``: acknowledged, not folded, rejected as ``duplicate`` while another
      update of the same device was folded in that round (a restarted device trains the open
      round again): not a loss either;
    - ``lost``: any other acknowledged update that was never folded, i.e. one the broker
      acknowledged that never reached the aggregator, or reached it while its round was open
      and still did not count. Must be 0.

    ``max_abs_diff_vs_reference``: the final model against the exact FedAvg of the scripted
    deltas of the devices each summary lists (``grid_delta``): with ``drop_devices`` which
    devices make a round depends on timing, so the reference follows the summaries; it checks
    that the model holds exactly the updates the summaries name, each once. With
    ``restart_broker`` every round needs every device, so it is the fault-free reference.
    """

    broker: BrokerConfig
    directory: Path
    devices: int = 4
    rounds: int = 3
    weights: list[int] | None = None
    min_updates: int | None = None
    max_updates: int | None = None
    grace_s: float = 1.0
    deadline_s: float = 60.0
    keepalive: int = 5
    train_delay: tuple[float, float] = (0.02, 0.3)
    seed: int = 0
    federation: str = field(default_factory=lambda: f"fault-{uuid.uuid4().hex[:8]}")
    kills: int = 0

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.w = self.weights or [i + 1 for i in range(self.devices)]
        self.min_n = self.min_updates or self.devices
        self.max_n = self.max_updates or self.devices
        self.unit = grid_unit(self.w, self.min_n, self.max_n)
        if self.unit > 4096:
            raise ValueError(f"weights {self.w} make a grid unit of {self.unit}: too coarse")
        self.state = self.directory / "state"
        self.log = self.directory / "aggregator.log"
        self.config = self.directory / "aggregator.toml"
        init = self.directory / "initial.npz"
        arrays: dict[str, Any] = dict(self.initial_model())
        np.savez(init, **arrays)
        self.config.write_text(_aggregator_toml(
            self.federation, self.broker, self.state, f'path = "{init}"',
            min_updates=self.min_n, max_updates=self.max_n, deadline_s=self.deadline_s,
            grace_s=self.grace_s, max_rounds=0))
        suffix = self.federation.rsplit("-", 1)[-1]
        self.procs: list[DeviceProc] = []
        for i in range(self.devices):
            home = self.directory / f"dev{i}"
            home.mkdir(exist_ok=True)
            dev = DeviceProc(i, f"d{i}-{suffix}", home / "spec.json", home / "agent.log")
            dev.spec.write_text(json.dumps({
                "host": self.broker.host, "port": self.broker.port,
                "keepalive": self.keepalive, "federation": self.federation,
                "device_id": dev.device_id, "index": i, "weight": self.w[i], "unit": self.unit,
                "delay": list(self.train_delay), "seed": self.seed, "state_dir": str(home),
                "journal": str(home / "journal.jsonl")}))
            self.procs.append(dev)
        self.journals = Journals([d.spec.parent / "journal.jsonl" for d in self.procs])
        self.agg: subprocess.Popen[bytes] | None = None

    def initial_model(self) -> dict[str, F32]:
        """``init_mlp`` rounded to multiples of 2**-10 (see ``grid_delta``)."""
        return {k: (np.round(v * 1024) / 1024).astype(np.float32)
                for k, v in init_mlp(LAYERS, SEED).items()}

    def reference(self, summaries: Sequence[RoundSummary]) -> dict[str, F32]:
        """FedAvg of the scripted deltas of the devices each summary lists, round by round."""
        index = {d.device_id: d.index for d in self.procs}
        model = self.initial_model()
        for s in sorted(summaries, key=lambda s: s.round):
            members = [index[d] for d, _ in s.accepted]
            total = float(sum(self.w[i] for i in members))
            new = {}
            for k, v in model.items():
                acc = np.zeros(v.shape, dtype=np.float64)
                for i in members:
                    acc += grid_delta(s.round, i, self.unit, k, v.shape).astype(np.float64) \
                        * self.w[i]
                new[k] = (v.astype(np.float64) + acc / total).astype(np.float32)
            model = new
        return model

    # ---------------------------------------------------------------- processes

    def start_aggregator(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with self.log.open("ab") as out:
            self.agg = subprocess.Popen(
                aggregator_command(self.config), env=env,
                stdout=out, stderr=subprocess.STDOUT)

    def start_device(self, dev: DeviceProc) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with dev.log.open("ab") as out:
            dev.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "device", str(dev.spec)],
                env=env, stdout=out, stderr=subprocess.STDOUT)
        dev.frozen = dev.away = False

    def signal_device(self, dev: DeviceProc, sig: signal.Signals) -> None:
        if dev.proc is not None and dev.proc.poll() is None:
            dev.proc.send_signal(sig)

    def stop_device(self, dev: DeviceProc, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the process (SIGTERM: the agent stops cleanly; SIGKILL: a crash)."""
        if dev.proc is None:
            return
        if dev.frozen:
            self.signal_device(dev, signal.SIGCONT)
            dev.frozen = False
        self.signal_device(dev, sig)
        try:
            dev.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            dev.proc.kill()
            dev.proc.wait()

    def _log_quiet(self, quiet_s: float = 1.0, limit_s: float = 10.0) -> None:
        """Wait until the aggregator's log has not grown for ``quiet_s`` (it handled what came)."""
        size, since, end = -1, time.monotonic(), time.monotonic() + limit_s
        while time.monotonic() < end:
            now_size = self.log.stat().st_size
            if now_size != size:
                size, since = now_size, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return
            time.sleep(0.1)

    # ---------------------------------------------------------------- running

    def _drive(self, step: Callable[[int], None], timeout: float,
               stall_s: float) -> dict[str, Any]:
        """Start everything, call ``step(rounds_closed)`` every turn until round ``rounds``
        has closed (or nothing closed for ``stall_s``), stop everything, account."""
        t0 = time.monotonic()
        # A persistent session: a broker restarted from its save still has the subscription.
        watch = PahoTransport(self.broker, client_id=f"watch-{self.federation}",
                              session_expiry_s=600)
        watcher = ModelSubscriber(self.broker, self.federation, transport=watch,
                                  summaries=True).start()
        if not watch.wait_connected(10):
            raise RuntimeError("the watcher could not connect")
        time.sleep(0.2)  # its SUBACKs
        self.start_aggregator()
        for dev in self.procs:
            self.start_device(dev)
        try:
            stalled = self._until_last_round(watcher, step, t0 + timeout, stall_s)
            # Devices first (whatever they still send reaches the aggregator), then the
            # aggregator once it has handled it all.
            for dev in self.procs:
                self.stop_device(dev)
            self._log_quiet()
            end = time.monotonic() + 2
            while time.monotonic() < end:
                watcher.poll(0.1)
        finally:
            self._stop_everything()
            watcher.stop()
        self.journals.poll()
        summaries = [s for s in watcher.summaries.values() if s.round <= self.rounds]
        result = self.account(summaries)
        result["stalled"] = int(stalled)
        result["seconds"] = round(time.monotonic() - t0, 1)
        return result

    def _until_last_round(self, watcher: ModelSubscriber, step: Callable[[int], None],
                          deadline: float, stall_s: float) -> bool:
        """Call ``step`` until round ``rounds`` has closed; True if nothing closed for
        ``stall_s`` seconds first."""
        seen, progress = 0, time.monotonic()
        while True:
            watcher.poll(0.02)
            self.journals.poll()
            now = time.monotonic()
            latest = watcher.latest
            closed = max([s.round for s in watcher.summaries.values()]
                         + [latest.version if latest is not None else 0])
            if closed != seen:
                seen, progress = closed, now
            if closed >= self.rounds:
                return False
            assert self.agg is not None
            if self.agg.poll() is not None:
                raise RuntimeError(f"aggregator exited {self.agg.returncode}: "
                                   f"{self.log.read_text()[-3000:]}")
            if now - progress > stall_s:
                return True
            if now > deadline:
                raise TimeoutError(f"drill did not finish in time ({closed} rounds closed)")
            step(closed)

    def _stop_everything(self) -> None:
        for dev in self.procs:
            self.stop_device(dev, signal.SIGKILL)
        if self.agg is not None and self.agg.poll() is None:
            self.agg.terminate()
            try:
                self.agg.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.agg.kill()
                self.agg.wait()

    def account(self, summaries: Sequence[RoundSummary]) -> dict[str, Any]:
        """The drill keys (see the class docstring)."""
        folded = [(s.round, d, uid) for s in summaries for d, uid in s.accepted]
        folded_ids = {uid for _, _, uid in folded}
        counted = Counter((r, d) for r, d, _ in folded)
        double = (len(folded) - len(folded_ids)
                  + sum(c - 1 for c in counted.values() if c > 1))
        why = verdicts(self.log)
        stale = duplicate = 0
        lost = []
        for uid, acked_at in sorted(self.journals.acked.items(), key=lambda kv: kv[1]):
            if uid in folded_ids:
                continue
            device, round_ = self.journals.sent.get(uid, ("?", -1))
            reasons = set(why.get(uid, []))
            if round_ > self.rounds:
                continue  # trained after the last round we count
            if reasons & {"stale", "round_closed"}:
                stale += 1
            elif "duplicate" in reasons and (round_, device) in counted:
                duplicate += 1
            else:
                lost.append({"uid": uid, "device": device, "round": round_,
                             "acked_at": acked_at, "verdicts": sorted(reasons)})
        # Second copies of folded updates (broker redeliveries, outbox resends) turned away.
        ignored = sum(len(why.get(uid, [])) for uid in folded_ids)
        sent = {u for u, (_, r) in self.journals.sent.items() if r <= self.rounds}
        versions = ModelHistory(self.state / "models", keep=10).versions()
        diff: float | None = None
        have = sorted(s.round for s in summaries)
        if self.rounds in versions and have == list(range(1, self.rounds + 1)):
            final = compression.decode_all(
                ModelHistory(self.state / "models", keep=10).load(self.rounds).tensors)
            reference = self.reference(summaries)
            diff = max(float(np.abs(final[k].astype(np.float64) - reference[k]).max())
                       for k in reference)
        problems = round_problems(summaries, self.rounds, self.min_n, self.max_n)
        return {
            "devices": self.devices,
            "min_updates": self.min_n,
            "max_updates": self.max_n,
            "sent": len(sent),
            "acked": len(sent & set(self.journals.acked)),
            "unacked": len(sent - set(self.journals.acked)),
            "folded": len(folded),
            "rejected_stale": stale,
            "rejected_duplicate": duplicate,
            "duplicates_ignored": ignored,
            "lost": len(lost),
            "double_counted": double,
            "max_abs_diff_vs_reference": diff,
            "kills": self.kills,
            "rounds": len(summaries),
            "rounds_expected": self.rounds,
            "closed_by": dict(Counter(s.closed_by for s in summaries)),
            "round_rule_violations": problems,
            "lost_updates": lost,
        }


@dataclass
class RestartBrokerDrill(AgentDrill):
    """SIGKILL Mosquitto ``kills`` times at random moments and restart it on the same port.

    The broker must persist (``PersistentMosquitto``). Every round needs every device
    (``min_updates = max_updates = devices``), so a lost update shows as a round that never
    closes: the drill then stops after ``stall_s`` and reports it (``stalled``, ``lost``).
    """

    keepalive: int = 5

    def run(self, broker: MosquittoBroker, kills: int, rng: random.Random,
            timeout: float = 120.0, stall_s: float = 30.0) -> dict[str, Any]:
        total = self.devices * self.rounds
        # After a random number of updates sent (and a random moment more), so kills land
        # between a device's publish and its PUBACK, between the broker's PUBACK and its
        # delivery or save, around acks from the aggregator and around round changes.
        schedule = sorted(rng.choices(range(1, total), k=kills))
        downtime: list[float] = []

        def step(closed: int) -> None:
            if self.kills < kills and len(self.journals.sent) >= schedule[self.kills]:
                time.sleep(rng.uniform(0.0, 0.1))
                broker.kill()
                self.kills += 1
                pause = rng.uniform(0.1, 1.0)
                downtime.append(pause)
                time.sleep(pause)
                broker.start()

        result = self._drive(step, timeout, stall_s)
        db = broker.directory / "mosquitto.db" if isinstance(broker, PersistentMosquitto) \
            else None
        result["broker_db_bytes"] = db.stat().st_size if db is not None and db.exists() else 0
        result["broker_down_s_total"] = round(sum(downtime), 2)
        return result


@dataclass
class DropDevicesDrill(AgentDrill):
    """Devices vanish mid-round and come back later, ``drops`` times (planned in rounds
    1..rounds-2, carried out then or a little later).

    Three ways to vanish, in equal numbers, shuffled: ``kill`` (SIGKILL: the process dies,
    maybe mid-training or between publish and PUBACK; it returns as a new process, new
    connection, same outbox), ``stop`` (SIGTERM: the agent stops cleanly, finishing a training
    in progress first; returns as a new process) and ``freeze`` (SIGSTOP past the keepalive, so
    the broker drops the connection without the device sending anything; SIGCONT later: the
    same process reconnects). A drop happens 0-0.4 s after its round opens (devices train for
    ``train_delay``) and the device stays away 0.2-2.5 s (a freeze: 1.5 keepalives and up to
    1.5 s more), often past the round's close. At most ``devices - min_updates`` are away at
    once (a drop waits until one is back; those still waiting when the last round opens are
    ``drops_skipped``), so every round can reach its quorum and closes at quorum + grace or when
    all devices are in. A device that returns late has its update join the round still open or
    rejected as ``stale`` (it then trains on the next announcement). Everyone is back when the
    last round opens.
    """

    keepalive: int = 2
    _rng: random.Random = field(default_factory=random.Random, init=False)
    _plan: Counter[int] = field(default_factory=Counter, init=False)
    _modes: list[str] = field(default_factory=list, init=False)
    _events: list[tuple[float, int, str, int]] = field(default_factory=list, init=False)
    _seq: Iterator[int] = field(default_factory=itertools.count, init=False)
    _done: Counter[str] = field(default_factory=Counter, init=False)
    _round: int = field(default=0, init=False)

    def run(self, drops: int, rng: random.Random, timeout: float = 120.0,
            stall_s: float = 30.0) -> dict[str, Any]:
        self._rng = rng
        self._plan = Counter(rng.choice(range(1, max(self.rounds - 1, 2))) for _ in range(drops))
        self._modes = ["kill", "stop", "freeze"] * (drops // 3 + 1)
        rng.shuffle(self._modes)
        result = self._drive(self._step, timeout, stall_s)
        modes = ("kill", "stop", "freeze")
        result["drops"] = sum(self._done[m] for m in modes)
        result["drops_by_mode"] = {m: self._done[m] for m in modes}
        result["drops_skipped"] = self._done["skipped"]
        return result

    def _at(self, when: float, action: str, index: int = -1) -> None:
        heapq.heappush(self._events, (when, next(self._seq), action, index))

    def _step(self, closed: int) -> None:
        now = time.monotonic()
        current = closed + 1
        if current != self._round:
            self._round = current
            if current >= self.rounds:  # the last round: everyone back, no more drops
                self._done["skipped"] += sum(e[2] == "vanish" for e in self._events)
                self._events.clear()
                for dev in self.procs:
                    self._come_back(dev)
            else:
                for _ in range(self._plan[current]):
                    self._at(now + self._rng.uniform(0.0, 0.4), "vanish")
        while self._events and self._events[0][0] <= now:
            _, _, action, index = heapq.heappop(self._events)
            if action == "vanish":
                self._vanish()
            else:
                self._come_back(self.procs[index])

    def _vanish(self) -> None:
        here = [d for d in self.procs if not d.away]
        if len(self.procs) - len(here) >= self.devices - self.min_n or not here:
            self._at(time.monotonic() + 0.3, "vanish")  # too many away: a little later
            return
        dev = self._rng.choice(here)
        mode = self._modes.pop()
        if mode == "freeze":
            self.signal_device(dev, signal.SIGSTOP)
            dev.frozen = True
            away = 1.5 * self.keepalive + self._rng.uniform(0.3, 1.5)
        else:
            self.stop_device(dev, signal.SIGKILL if mode == "kill" else signal.SIGTERM)
            away = self._rng.uniform(0.2, 2.5)
            self.kills += mode == "kill"
        dev.away = True
        self._done[mode] += 1
        self._at(time.monotonic() + away, "return", dev.index)

    def _come_back(self, dev: DeviceProc) -> None:
        if not dev.away:
            return
        if dev.frozen:
            self.signal_device(dev, signal.SIGCONT)
            dev.frozen = dev.away = False
        else:
            self.start_device(dev)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "device":
        sys.exit("usage: faultkit.py device SPEC.json")
    sys.exit(device_main(Path(sys.argv[2])))
