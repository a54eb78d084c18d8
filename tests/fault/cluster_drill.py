"""Scale-out fault drills (issue 13, acceptance 2): a coordinator and two workers as real
processes (``python -m aggregator --config X.toml``) on a real 3-node NATS JetStream cluster,
devices driven from here, and one of three faults ``kills`` times, each mid-round:

``cluster_node``
    SIGKILL the node that leads ``$MQTT_msgs`` (the stream the workers' persistent sessions
    read), restart it on the same ports and store. The next node kill waits until every replica
    of the stream is current again (three replicas: one down at a time keeps a quorum).
``cluster_worker``
    SIGKILL a worker process (w0, w1, w0, ...), start it again.
``cluster_coordinator``
    SIGKILL the coordinator process, start it again.

Every process is durable (``[durability] state_dir``: persistent sessions, write-ahead log,
acknowledge after sync); all start at once, the coordinator first (round 1 waits for every
worker's first report). Devices are raw paho MQTT 3.1.1 clients with persistent sessions
(``clean_session`` false) that know every node's endpoint and move to the next one whenever
their connection drops or a connect fails; paho resends an unacknowledged QoS 1 update after
each reconnect. Each device answers each round's announcement once with a deterministic update
(seeded by device and round) on the 2**-10 grid with integer weights, so every sum is exact and
a rerun sends the same bits.

A run is the fault-free run first, then the one with faults (same cluster, a fresh federation
and fresh processes each). Keys (``ClusterDrill.account``):

``lost``
    Updates whose PUBACK the device received (paho's ``on_publish``) but that are not among the
    contributors of their round's merged partials (= the coordinator's ``RoundSummary.accepted``).
``double_counted``
    An update folded twice: in two rounds, twice in one round's partials, or one device's two
    updates in one round.
``max_abs_diff_vs_reference``
    The final model against a reference computed here from the devices' own update bits, summed
    like the coordinator (worker-name order, each worker's contributors in its order, float64).
``bit_identical_to_fault_free``
    The final model's bytes equal the fault-free run's.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.history import ModelHistory
from fedmq import cluster_wire, codec, compression
from fedmq.models import init_mlp
from fedmq.nats_cluster import MQTT_MSGS_STREAM, NatsCluster, default_template
from fedmq.sharding import shard_of
from fedmq.topics import Topics
from fedmq.wire import GlobalModel, ModelUpdate, RoundAnnouncement, RoundSummary

ROOT = Path(__file__).resolve().parents[2]
F32 = npt.NDArray[np.float32]
LAYERS = [6, 4, 3]
SEED = 2
WORKERS = ("w0", "w1")
KINDS = ("cluster_node", "cluster_worker", "cluster_coordinator")
Endpoint = tuple[str, int]


# ------------------------------------------------------------------------ MQTT clients


class RotatingClient:
    """A paho MQTT 3.1.1 client with a persistent session that moves to the next endpoint
    whenever its connection drops or a connect attempt fails (the cluster's other nodes hold
    its session), and resubscribes on every connect (retained messages come again)."""

    def __init__(self, client_id: str, endpoints: Sequence[Endpoint], home: int,
                 topics: Sequence[str]) -> None:
        self.endpoints = list(endpoints)
        self.at = home % len(self.endpoints)
        self.topics = list(topics)
        self.lock = threading.Lock()
        self.connects = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv311, clean_session=False)
        self.client.reconnect_delay_set(0.1, 0.5)  # type: ignore[arg-type]  # floats work
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_message = self._on_message

    def start(self) -> None:
        host, port = self.endpoints[self.at]
        self.client.connect_async(host, port, keepalive=5)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def wait_connected(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.client.is_connected():
                return True
            time.sleep(0.02)
        return False

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                    properties: Any) -> None:
        if reason.is_failure:
            self._rotate()
            return
        self.connects += 1
        if self.topics:
            client.subscribe([(t, 1) for t in self.topics])

    def _rotate(self) -> None:
        self.at = (self.at + 1) % len(self.endpoints)
        host, port = self.endpoints[self.at]
        with contextlib.suppress(RuntimeError):  # still open: paho retries the old one once
            self.client.host, self.client.port = host, port

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any,
                       properties: Any) -> None:
        self._rotate()

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._rotate()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        raise NotImplementedError


class Device(RotatingClient):
    """Answers each open announcement once with ``delta(round)`` at weight ``weight``; records
    which of its updates the broker acknowledged."""

    def __init__(self, federation: str, index: int, endpoints: Sequence[Endpoint], *,
                 gaussian: bool = False) -> None:
        self.federation = federation
        self.gaussian = gaussian
        self.index = index
        self.device_id = f"dev-{index}"
        self.weight = index + 1
        self.t = Topics(federation)
        super().__init__(f"{federation}-{self.device_id}", endpoints, index, [self.t.round])
        self.client.on_publish = self._on_publish
        self.announcement: RoundAnnouncement | None = None
        self.sent: dict[int, ModelUpdate] = {}  # round -> the update
        self.mids: dict[int, str] = {}  # paho message id -> update id
        self.acked: dict[str, float] = {}  # update id -> when its PUBACK arrived

    def delta(self, round_: int) -> dict[str, F32]:
        """On the 2**-10 grid (every sum exact, in any order), or ``gaussian`` (sums rounded:
        their bits depend on the order the worker folds them in)."""
        rng = np.random.default_rng([round_, self.index, 17])
        if self.gaussian:
            return {k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32)
                    for k, v in init_mlp(LAYERS, SEED).items()}
        return {k: (rng.integers(-64, 64, v.shape) / 1024).astype(np.float32)
                for k, v in init_mlp(LAYERS, SEED).items()}

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            m = codec.decode(bytes(msg.payload))
        except Exception:
            return
        if isinstance(m, RoundAnnouncement) and m.federation == self.federation:
            with self.lock:
                a = self.announcement
                if a is None or (m.run, m.round) >= (a.run, a.round):
                    self.announcement = m

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any,
                    properties: Any) -> None:
        with self.lock:  # held by ``answer`` until the mid is recorded
            uid = self.mids.get(mid)
            if uid is not None:
                self.acked.setdefault(uid, time.time())

    def answer(self, rounds: int) -> bool:
        """Send this device's update for the open round if not sent yet; True if sent."""
        with self.lock:
            a = self.announcement
            if a is None or not a.open or a.round > rounds or a.round in self.sent:
                return False
            uid = f"{self.device_id}-r{a.round}"
            u = ModelUpdate(federation=self.federation, device_id=self.device_id,
                            round=a.round, base_version=a.base_version, update_id=uid,
                            num_examples=self.weight,
                            tensors=compression.encode_all(self.delta(a.round)), run=a.run)
            info = self.client.publish(self.t.update(self.device_id), codec.encode(u), qos=1)
            self.mids[info.mid] = uid
            self.sent[a.round] = u
            return True


class Watcher(RotatingClient):
    """Records summaries, partials and models (persistent session: nothing missed across node
    kills)."""

    def __init__(self, federation: str, endpoints: Sequence[Endpoint]) -> None:
        self.federation = federation
        t = Topics(federation)
        super().__init__(f"{federation}-watch-{uuid.uuid4().hex[:6]}", endpoints, 0,
                         [t.metrics, t.model, t.partials])
        self.summaries: dict[int, list[RoundSummary]] = {}
        self.partials: dict[tuple[int, str], list[cluster_wire.WorkerPartial]] = {}
        self.models: dict[int, GlobalModel] = {}

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if "/partial/" in msg.topic:
            try:
                p = cluster_wire.decode(bytes(msg.payload))
            except Exception:
                return
            if isinstance(p, cluster_wire.WorkerPartial):
                with self.lock:
                    self.partials.setdefault((p.round, p.worker), []).append(p)
            return
        try:
            m = codec.decode(msg.payload)
        except Exception:
            return
        with self.lock:
            if isinstance(m, RoundSummary) and m.federation == self.federation:
                self.summaries.setdefault(m.round, []).append(m)
            elif isinstance(m, GlobalModel) and m.federation == self.federation:
                self.models[m.version] = m


# ------------------------------------------------------------------------ processes


def _toml(federation: str, endpoint: Endpoint, state: Path, *, rounds: int, devices: int,
          cluster: str) -> str:
    host, port = endpoint
    return f'federation = "{federation}"\n' + textwrap.dedent(f"""
        [broker]
        host = "{host}"
        port = {port}
        mqtt5 = false
        keepalive = 5
        reconnect_min_s = 0.1
        reconnect_max_s = 0.5
        [model]
        layers = {LAYERS}
        seed = {SEED}
        [rounds]
        min_updates = {devices}
        max_updates = {devices}
        deadline_s = 900
        grace_s = 0.0
        max_rounds = {rounds}
        [robust]
        mode = "off"
        [durability]
        state_dir = "{state}"
        session_expiry_s = 600
        history_keep = {max(10, rounds + 1)}
        [cluster]
        """) + cluster


@dataclass
class Proc:
    """One aggregator role as a process (``python -m aggregator --config``)."""

    name: str
    config: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with self.log.open("ab") as out:  # a file: nobody has to drain it
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "aggregator", "--config", str(self.config)],
                env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT))

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def wait_started(self, timeout: float) -> None:
        """Until the log says the role started (connected and subscribed)."""
        end = time.monotonic() + timeout
        while b" started (" not in self.log.read_bytes():
            if not self.alive() or time.monotonic() > end:
                raise RuntimeError(f"{self.name} did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def replicas_current(cluster: NatsCluster, stream: str = MQTT_MSGS_STREAM) -> bool:
    """Whether ``stream`` has a live leader and every replica reports itself current (what a
    node kill must wait for, so one node down at a time never costs the stream its quorum)."""
    leader = cluster.stream_leader_index(stream)
    if leader is None or not cluster.running(leader):
        return False
    body = cluster.jsz(leader, "streams=true")
    for account in (body or {}).get("account_details") or []:
        for detail in account.get("stream_detail") or []:
            if detail.get("name") == stream:
                info = detail.get("cluster") or {}
                replicas = info.get("replicas") or []
                return all(r.get("current") and not r.get("offline") for r in replicas)
    return False


def consumer_states(cluster: NatsCluster, stream: str = MQTT_MSGS_STREAM) -> list[dict[str, Any]]:
    """Every consumer of ``stream`` as the stream's leader reports it (the MQTT sessions'
    subscriptions): filter, pending, waiting for an ack, redelivered."""
    leader = cluster.stream_leader_index(stream)
    body = cluster.jsz(leader, "streams=true&consumers=true&config=true") \
        if leader is not None else None
    out = []
    for account in (body or {}).get("account_details") or []:
        for detail in account.get("stream_detail") or []:
            if detail.get("name") != stream:
                continue
            for c in detail.get("consumer_detail") or []:
                cfg = c.get("config") or {}
                out.append({"name": c.get("name"), "filter": cfg.get("filter_subject"),
                            "num_pending": c.get("num_pending"),
                            "num_ack_pending": c.get("num_ack_pending"),
                            "num_redelivered": c.get("num_redelivered"),
                            "delivered": c.get("delivered"), "ack_floor": c.get("ack_floor"),
                            "push_bound": c.get("push_bound")})
    return out


# ------------------------------------------------------------------------ the drill


@dataclass
class ClusterDrill:
    """One run on ``cluster`` (started, with shards={federation: 2}): coordinator on node 0,
    worker k on node 1 + k, device i homed on node i mod 3."""

    cluster: NatsCluster
    workdir: Path
    federation: str
    devices: int = 8
    rounds: int = 8
    stall_s: float = 90.0
    #: Gaussian updates instead of the exact grid (``Device.delta``).
    gaussian: bool = False
    kills: int = 0
    kill_log: list[dict[str, Any]] = field(default_factory=list)
    #: On a stall: the engine's consumers of $MQTT_msgs (what each session has pending).
    diagnostics: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ends = self.cluster.mqtt_endpoints
        self.t = Topics(self.federation)
        self.coord = Proc("coordinator", self.workdir / "coordinator.toml",
                          self.workdir / "coordinator.log")
        self.coord_state = self.workdir / "coordinator"
        self.coord.config.write_text(_toml(
            self.federation, ends[0], self.coord_state, rounds=self.rounds,
            devices=self.devices, cluster=f'role = "coordinator"\nworkers = {list(WORKERS)}\n'
            "progress_interval_s = 0.05\n"))
        self.workers: list[Proc] = []
        for k, name in enumerate(WORKERS):
            w = Proc(name, self.workdir / f"{name}.toml", self.workdir / f"{name}.log")
            w.config.write_text(_toml(
                self.federation, ends[(1 + k) % len(ends)], self.workdir / name,
                rounds=self.rounds, devices=self.devices,
                cluster=f'role = "worker"\nname = "{name}"\nshards = {len(WORKERS)}\n'
                f"shard = {k}\nprogress_interval_s = 0.05\n"))
            self.workers.append(w)
        self.device_list = [Device(self.federation, i, ends, gaussian=self.gaussian)
                            for i in range(self.devices)]
        shards = Counter(shard_of(d.device_id, len(WORKERS)) for d in self.device_list)
        if len(shards) != len(WORKERS):
            raise ValueError(f"{self.devices} devices leave a shard empty: {dict(shards)}")
        self.watcher = Watcher(self.federation, ends)

    # ---------------------------------------------------------------- running

    def sent_count(self) -> int:
        return sum(len(d.sent) for d in self.device_list)

    def open_round(self) -> int:
        return max((d.announcement.round for d in self.device_list
                    if d.announcement is not None and d.announcement.open), default=0)

    def run(self, kind: str | None, kills: int, rng: random.Random,
            timeout: float = 900.0) -> dict[str, Any]:
        """All rounds, with ``kills`` faults of ``kind`` (None: fault-free)."""
        t0 = time.monotonic()
        schedule = self._schedule(kills, rng)
        self._start_all()
        restarting: threading.Thread | None = None
        stalled = False
        try:
            seen, progress = 0, time.monotonic()
            while True:
                now = time.monotonic()
                closed = len(self.coord_versions())
                if closed != seen:
                    seen, progress = closed, now
                if closed >= self.rounds and not self.coord.alive():
                    break
                if now - progress > self.stall_s:
                    stalled = True
                    self.diagnostics = consumer_states(self.cluster)
                    break
                if now - t0 > timeout:
                    raise TimeoutError(f"drill did not finish in {timeout} s "
                                       f"({closed} rounds closed)")
                self._check_processes()
                for d in rng.sample(self.device_list, len(self.device_list)):
                    if d.answer(self.rounds):
                        break  # one update per turn: the round's updates trickle in
                busy = restarting is not None and restarting.is_alive()
                if kind is not None and self.kills < kills and not busy and closed < self.rounds \
                        and self.sent_count() >= schedule[self.kills] \
                        and (kind != "cluster_node" or replicas_current(self.cluster)):
                    time.sleep(rng.uniform(0.0, 0.05))
                    restarting = self._fault(kind, rng)
                time.sleep(0.03)
            if restarting is not None:
                restarting.join()
            # The last summary and partials reach the watcher.
            end = time.monotonic() + 10
            while time.monotonic() < end and not self._have_all():
                time.sleep(0.1)
        finally:
            if restarting is not None:
                restarting.join()
            for d in self.device_list:
                d.stop()
            self.coord.terminate()
            for w in self.workers:
                w.terminate()
            self.watcher.stop()
        result = self.account()
        result["stalled"] = stalled
        if stalled:
            result["stall_consumers"] = self.diagnostics
        result["seconds"] = round(time.monotonic() - t0, 1)
        return result

    def _schedule(self, kills: int, rng: random.Random) -> list[int]:
        """When to kill, in updates sent: one kill per chosen round (spread over rounds
        1..rounds-1), after 1..devices-1 of that round's updates (and 0-50 ms more): mid-round."""
        rounds = list(range(1, max(self.rounds, 2)))
        chosen = sorted(rng.sample(rounds, kills) if kills <= len(rounds)
                        else rng.choices(rounds, k=kills))
        return [(r - 1) * self.devices + rng.randint(1, self.devices - 1) for r in chosen]

    def _start_all(self) -> None:
        self.watcher.start()
        if not self.watcher.wait_connected(30):
            raise RuntimeError("the watcher could not connect")
        # The coordinator first, the workers right after, without waiting: the engine drops an
        # update routed to a shard no session has subscribed to yet, so round 1 must wait for
        # every worker's first report (the coordinator's job, not the operator's).
        self.coord.start()
        for w in self.workers:
            w.start()
        for d in self.device_list:
            d.start()

    def _check_processes(self) -> None:
        """Raise if a role exited by itself (other than the coordinator at the end)."""
        c = self.coord.proc
        if c is not None and c.poll() is not None and c.returncode not in (0, -signal.SIGKILL):
            raise RuntimeError(f"coordinator exited {c.returncode}: "
                               f"{self.coord.log.read_text()[-3000:]}")
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is not None:
                raise RuntimeError(f"{w.name} exited {w.proc.returncode}: "
                                   f"{w.log.read_text()[-3000:]}")

    def _have_all(self) -> bool:
        with self.watcher.lock:
            return all(r in self.watcher.summaries for r in range(1, self.rounds + 1))

    def coord_versions(self) -> list[int]:
        return [v for v in ModelHistory(self.coord_state / "models", keep=1000).versions()
                if v >= 1]

    def _fault(self, kind: str, rng: random.Random) -> threading.Thread | None:
        at: dict[str, Any] = {"round": self.open_round(), "sent": self.sent_count(),
                              "t": round(time.time(), 3)}
        if kind == "cluster_node":
            i = self.cluster.stream_leader_index()
            if i is None:
                return None
            self.cluster.kill(i)
            self.kills += 1
            at["node"] = self.cluster.nodes[i].name
            pause = rng.uniform(0.2, 1.0)

            def back() -> None:
                time.sleep(pause)
                self.cluster.restart(i)

            thread = threading.Thread(target=back, name="node-restart", daemon=True)
            thread.start()
            self.kill_log.append(at)
            return thread
        proc = self.coord if kind == "cluster_coordinator" else \
            self.workers[self.kills % len(self.workers)]
        if not proc.alive():
            return None  # the coordinator has finished
        proc.kill()
        self.kills += 1
        at["process"] = proc.name
        self.kill_log.append(at)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.start()
        return None

    # ---------------------------------------------------------------- accounting

    def final_model(self) -> dict[str, F32] | None:
        if self.rounds not in self.coord_versions():
            return None
        model = ModelHistory(self.coord_state / "models", keep=1000).load(self.rounds)
        return {k: np.array(v) for k, v in compression.decode_all(model.tensors).items()}

    def merged_partials(self) -> dict[int, list[cluster_wire.WorkerPartial]]:
        """Per round, each worker's partial (the last copy: they must all agree), name order."""
        out: dict[int, list[cluster_wire.WorkerPartial]] = {}
        with self.watcher.lock:
            for (round_, _worker), copies in sorted(self.watcher.partials.items()):
                if 1 <= round_ <= self.rounds:
                    out.setdefault(round_, []).append(copies[-1])
        return out

    def account(self) -> dict[str, Any]:
        updates = {(d.device_id, u.update_id): u for d in self.device_list
                   for u in d.sent.values()}
        acked = {uid: (d.device_id, r) for d in self.device_list
                 for r, u in d.sent.items() for uid in [u.update_id] if uid in d.acked}
        with self.watcher.lock:
            summaries = {r: s[-1] for r, s in self.watcher.summaries.items()
                         if 1 <= r <= self.rounds}
            conflicting = sum(len({p.contributors for p in copies}) > 1
                              for copies in self.watcher.partials.values())
            summary_copies_differ = sum(len({s.accepted for s in c}) > 1
                                        for c in self.watcher.summaries.values())
        partials = self.merged_partials()
        # What each round's model holds: the merged partials' contributors (and the summary's
        # accepted pairs, which must be the same).
        folded: list[tuple[int, str, str]] = []
        summary_mismatch = []
        for r in range(1, self.rounds + 1):
            pairs = [pair for p in partials.get(r, []) for pair in p.contributors]
            folded.extend((r, d, u) for d, u in pairs)
            if r in summaries and sorted(summaries[r].accepted) != sorted(pairs):
                summary_mismatch.append(r)
        folded_ids = Counter(u for _, _, u in folded)
        per_round_device = Counter((r, d) for r, d, _ in folded)
        double = sum(c - 1 for c in folded_ids.values() if c > 1) \
            + sum(c - 1 for c in per_round_device.values() if c > 1)
        lost = sorted(uid for uid, (_, r) in acked.items()
                      if r <= self.rounds and uid not in folded_ids)
        wrong_round = sum(1 for r, d, u in folded if updates.get((d, u)) is None
                          or updates[(d, u)].round != r)
        final = self.final_model()
        versions = self.coord_versions()
        closed = [r for r in range(1, self.rounds + 1) if r in versions]
        diff: float | None = None
        reference = None
        if final is not None and len(closed) == self.rounds and all(
                len(partials.get(r, [])) == len(WORKERS) for r in closed):
            reference = self.reference(partials, updates)
            diff = max(float(np.abs(final[k].astype(np.float64)
                                    - reference[k].astype(np.float64)).max())
                       for k in reference)
        return {
            "devices": self.devices,
            "workers": len(WORKERS),
            "sent": len(updates),
            "acked": len(acked),
            "folded": len(folded),
            "lost": len(lost),
            "lost_updates": lost,
            "double_counted": double,
            "folded_in_wrong_round": wrong_round,
            "max_abs_diff_vs_reference": diff,
            "rounds_closed": len(closed),
            "rounds_expected": self.rounds,
            "summaries": len(summaries),
            "summary_vs_partials_mismatch": summary_mismatch,
            "summary_copies_differ": summary_copies_differ,
            "partial_copies_conflicting": conflicting,
            "kills": self.kills,
            "kill_points": self.kill_log,
            "contributor_orders": {str(r): {p.worker: [d for d, _ in p.contributors]
                                            for p in partials.get(r, [])}
                                   for r in range(1, self.rounds + 1)},
            "model_sha256": _digest(final) if final is not None else None,
        }

    def reference(self, partials: dict[int, list[cluster_wire.WorkerPartial]],
                  updates: dict[tuple[str, str], ModelUpdate]) -> dict[str, F32]:
        """The model after every round from the devices' own bits: base + (Σ over workers in
        name order of Σ over its contributors in order of w·x, float64) / Σ w, per round."""
        model = init_mlp(LAYERS, SEED)
        for r in range(1, self.rounds + 1):
            names = list(model)
            total = {n: np.zeros(model[n].size, dtype=np.float64) for n in names}
            weight = 0.0
            for p in sorted(partials[r], key=lambda p: p.worker):
                acc = {n: np.zeros(model[n].size, dtype=np.float64) for n in names}
                for pair in p.contributors:
                    u = updates[pair]
                    x = compression.decode_all(u.tensors)
                    for n in names:
                        acc[n] += float(u.num_examples) * x[n].astype(np.float64).ravel()
                    weight += float(u.num_examples)
                for n in names:
                    total[n] += acc[n]
            model = {n: (model[n].astype(np.float64).ravel() + total[n] / weight)
                     .astype(np.float32).reshape(model[n].shape) for n in names}
        return model


def _digest(model: dict[str, F32]) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(model):
        h.update(k.encode())
        h.update(np.ascontiguousarray(model[k]).tobytes())
    return h.hexdigest()


def template_with_ack_wait(directory: Path, ack_wait: str) -> Path:
    """The shipped node template with ``ack_wait`` in its ``mqtt`` block: how long the engine
    waits for a PUBACK before it redelivers a QoS 1 message (default 30 s). A message delivered
    to a session whose client then died comes again only after that long, even once the client
    is back: each worker or node kill can hold a round up to ``ack_wait``."""
    text = default_template().read_text(encoding="utf-8")
    marker = "mqtt {\n"
    if marker not in text:
        raise ValueError(f"no 'mqtt {{' block in {default_template()}")
    path = directory / "node.conf.template"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace(marker, f'{marker}  ack_wait: "{ack_wait}"\n', 1),
                    encoding="utf-8")
    return path


def run_cluster_drill(kind: str, tmp: Path, *, kills: int, rounds: int, devices: int,
                      seed: int = 0, fault_free: bool = True,
                      ack_wait: str | None = None, gaussian: bool = False) -> dict[str, Any]:
    """The fault-free run (unless ``fault_free`` is false), then ``kills`` faults of ``kind``,
    on one 3-node cluster (the shipped node template, or with ``ack_wait``); the drill's JSON
    keys."""
    if kind not in KINDS:
        raise ValueError(f"unknown cluster drill {kind!r}")
    rng = random.Random(seed)
    stem = uuid.uuid4().hex[:6]
    clean_fed, fault_fed = f"cfree{stem}", f"cfault{stem}"
    t0 = time.monotonic()
    template = template_with_ack_wait(tmp / "template", ack_wait) if ack_wait else None
    with NatsCluster(3, workdir=tmp / "nats", template=template,
                     shards={clean_fed: len(WORKERS), fault_fed: len(WORKERS)}) as cluster:
        clean: dict[str, Any] | None = None
        if fault_free:
            clean = ClusterDrill(cluster, tmp / "fault_free", clean_fed, devices=devices,
                                 rounds=rounds, gaussian=gaussian).run(None, 0,
                                                                       random.Random(seed))
        drill = ClusterDrill(cluster, tmp / "faults", fault_fed, devices=devices, rounds=rounds,
                             gaussian=gaussian)
        result = drill.run(kind, kills, rng)
    result["kills_requested"] = kills
    result["updates"] = "gaussian" if gaussian else "grid (2**-10 steps, exact sums)"
    result["engine_ack_wait"] = ack_wait or "30s (shipped template: nats-server default)"
    result["bit_identical_to_fault_free"] = (
        None if clean is None or clean["model_sha256"] is None
        else result["model_sha256"] == clean["model_sha256"])
    if clean is not None:
        result["contributor_order_differs_from_fault_free"] = [
            r for r, order in result["contributor_orders"].items()
            if order != clean["contributor_orders"].get(r)]
        result["fault_free"] = {k: clean[k] for k in (
            "lost", "double_counted", "max_abs_diff_vs_reference", "rounds_closed", "seconds",
            "model_sha256")}
    result["wall_s"] = round(time.monotonic() - t0, 1)
    return result


def cluster_passed(result: dict[str, Any]) -> bool:
    """lost 0, double-counted 0, every round closed, the model equal to the reference and (when
    the fault-free run was made) bit-identical to it, and every requested kill made."""
    diff = result["max_abs_diff_vs_reference"]
    return (result["lost"] == 0 and result["double_counted"] == 0
            and result["folded_in_wrong_round"] == 0
            and result["rounds_closed"] == result["rounds_expected"]
            and not result["stalled"] and diff is not None and diff == 0.0
            and result["kills"] >= result["kills_requested"]
            and result["partial_copies_conflicting"] == 0
            and not result["summary_vs_partials_mismatch"]
            and result.get("bit_identical_to_fault_free") is not False)


if __name__ == "__main__":  # quick manual run: python cluster_drill.py KIND KILLS DIR
    keep = Path(sys.argv[3])
    keep.mkdir(parents=True, exist_ok=True)
    out = run_cluster_drill(sys.argv[1], keep, kills=int(sys.argv[2]), rounds=4, devices=6,
                            fault_free=False)
    out.pop("contributor_orders", None)
    print(json.dumps(out, indent=2))
    sys.exit(0 if cluster_passed(out) else 1)
