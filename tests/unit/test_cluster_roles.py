"""The scale-out roles' logic over the in-process transport (docs/scaling.md): a coordinator and
two workers driven message by message, so each step's acknowledgements and messages can be
checked. The same roles over real brokers: tests/cluster."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from aggregator.cluster_coordinator import CoordinatorService
from aggregator.cluster_worker import WorkerService
from aggregator.service import AggregatorService
from fedmq import cluster_wire, codec
from fedmq.compression import decode_all, encode_all
from fedmq.config import (
    AggregatorConfig,
    ClusterConfig,
    DurabilityConfig,
    MetricsConfig,
    ModelConfig,
    RoundsConfig,
)
from fedmq.errors import DecodeError
from fedmq.memory_transport import MemoryHub, MemoryTransport
from fedmq.topics import Topics
from fedmq.transport import Message
from fedmq.wire import GlobalModel, ModelUpdate, RoundAnnouncement

FED = "cl"
T = Topics(FED)
LAYERS = [4, 3]
WORKERS = ("w0", "w1")


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def base_config(state: Path | None, role: ClusterConfig, devices: int) -> AggregatorConfig:
    return AggregatorConfig(
        federation=FED, model=ModelConfig(layers=LAYERS, seed=2),
        rounds=RoundsConfig(min_updates=devices, max_updates=devices, deadline_s=600.0,
                            grace_s=0.0, max_rounds=0),
        durability=DurabilityConfig(state_dir=str(state) if state else None,
                                    snapshot_every_updates=0, snapshot_every_s=0),
        cluster=role)


class Cluster:
    """A coordinator, two workers (w0 takes devices a*, w1 devices b*: each reads its own
    update topic here, as the engine's partitions would route them) and a device transport."""

    def __init__(self, tmp: Path, devices: int = 4,
                 workers: tuple[str, ...] = WORKERS, report: bool = True) -> None:
        self.hub = MemoryHub()
        self.tmp = tmp
        self.devices = devices
        self.clock = Clock()
        self.made: list[AggregatorService] = []
        self.coordinator = CoordinatorService(
            base_config(tmp / "c", ClusterConfig(role="coordinator", workers=list(workers),
                                                 progress_interval_s=0.01), devices),
            MemoryTransport(self.hub), clock=self.clock)
        self.workers = {w: self.worker(w) for w in workers}
        self.dev = MemoryTransport(self.hub)
        self.dev.start()
        self.dev.subscribe(T.round)
        self.dev.subscribe(T.model)
        self.dev.subscribe(T.summary if hasattr(T, "summary") else f"{T.base}/summary")
        self.coordinator.start()
        self.coordinator.stop()  # driven by hand below
        self.made.append(self.coordinator)
        # A fresh run's round 1 opens once every worker has reported (its heartbeat).
        assert T.round not in self.hub.retained
        if report:
            self.clock.now += 1.0
            for w in self.workers.values():
                w.step()
            self.coordinator.step(*_drain(self.coordinator))
        self.sent: dict[tuple[str, str], ModelUpdate] = {}

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        for svc in self.made:
            if svc.wal is not None:
                svc.wal.close()

    def worker(self, name: str) -> WorkerService:
        shard = WORKERS.index(name)
        w = WorkerService(
            base_config(self.tmp / name, ClusterConfig(role="worker", name=name, shards=2,
                                                        shard=shard, progress_interval_s=0.01),
                        self.devices),
            MemoryTransport(self.hub), clock=self.clock)
        w.start()
        w.stop()
        self.made.append(w)
        return w

    def update(self, device: str, ann: RoundAnnouncement, seed: int,
               round_: int | None = None, scale: float = 1.0) -> Message:
        rng = np.random.default_rng(seed)
        delta = {f"dense0.{k}": (rng.standard_normal(s) * scale).astype(np.float32)
                 for k, s in (("weight", (4, 3)), ("bias", (3,)))}
        u = ModelUpdate(federation=FED, device_id=device, round=round_ or ann.round,
                        base_version=ann.base_version, update_id=f"{device}-{seed}",
                        num_examples=3 + seed % 5, tensors=encode_all(delta), run=ann.run)
        self.sent[(device, u.update_id)] = u
        shard = 0 if device.startswith("a") else 1
        return Message(f"{T.base}/shard/{shard}/update/{device}", codec.encode(u), qos=1,
                       mid=seed + 1)

    def announcement(self) -> RoundAnnouncement:
        ann = codec.decode(self.hub.retained[T.round].payload)
        assert isinstance(ann, RoundAnnouncement)
        return ann

    def model(self) -> GlobalModel:
        m = codec.decode(self.hub.retained[T.model].payload)
        assert isinstance(m, GlobalModel)
        return m

    def pump(self, rounds: int = 50) -> None:
        """Let every service handle what is in its inbox, until all are empty."""
        for _ in range(rounds):
            busy = False
            for svc in (*self.workers.values(), self.coordinator):
                msgs = _drain(svc)
                self.clock.now += 0.02
                svc.step(*msgs)
                busy = busy or bool(msgs)
            if not busy:
                return


def _drain(svc: AggregatorService) -> list[Message]:
    out = []
    inbox = svc.transport.inbox
    while not inbox.empty():
        out.append(inbox.get())
    return out


def reference(base: GlobalModel, parts: Sequence[cluster_wire.WorkerPartial],
              sent: dict[tuple[str, str], ModelUpdate]) -> dict[str, np.ndarray]:
    w = {k: np.array(v) for k, v in decode_all(base.tensors).items()}
    total = {k: np.zeros(v.size) for k, v in w.items()}
    weight = 0.0
    for p in sorted(parts, key=lambda p: p.worker):
        acc = {k: np.zeros(v.size) for k, v in w.items()}
        for pair in p.contributors:
            u = sent[pair]
            x = decode_all(u.tensors)
            for k in w:
                acc[k] += float(u.num_examples) * x[k].astype(np.float64).ravel()
            weight += u.num_examples
        for k in w:
            total[k] += acc[k]
    return {k: (w[k].astype(np.float64).ravel() + total[k] / weight).astype(np.float32)
            .reshape(w[k].shape) for k in w}


def partials(hub: MemoryHub, sent_by: Sequence[Message]) -> list[cluster_wire.WorkerPartial]:
    out = []
    for m in sent_by:
        if "/partial/" in m.topic:
            p = cluster_wire.decode(m.payload)
            assert isinstance(p, cluster_wire.WorkerPartial)
            out.append(p)
    return out


def published(svc: AggregatorService) -> list[Message]:
    tr = svc.transport
    assert isinstance(tr, MemoryTransport)
    return tr.published


def test_a_fresh_run_opens_round_1_once_every_worker_has_reported(tmp_path: Path) -> None:
    # An update the engine routes to a shard no session has subscribed to yet is dropped after
    # its PUBACK: the first round must not be announced before each worker is subscribed.
    with Cluster(tmp_path, report=False) as c:
        c.clock.now += 1.0
        c.workers["w0"].step()  # w0's heartbeat (run 0)
        c.coordinator.step(*_drain(c.coordinator))
        assert T.round not in c.hub.retained
        c.workers["w1"].step()
        c.coordinator.step(*_drain(c.coordinator))
        ann = c.announcement()
        assert (ann.round, ann.open) == (1, True)


def test_a_round_merges_both_partials_into_the_fedavg_model(tmp_path: Path) -> None:
    with Cluster(tmp_path) as c:
        ann = c.announcement()
        base = c.model()
        for i, dev in enumerate(("a0", "a1", "b0", "b1")):
            c.hub.route(c.update(dev, ann, seed=i))
        c.pump()
        model = c.model()
        assert model.version == 1
        parts = partials(c.hub, published(c.workers["w0"]) + published(c.workers["w1"]))
        assert sorted(p.worker for p in parts) == ["w0", "w1"]
        assert sorted(d for p in parts for d, _ in p.contributors) == ["a0", "a1", "b0", "b1"]
        expected = reference(base, parts, c.sent)
        got = {k: np.array(v) for k, v in decode_all(model.tensors).items()}
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k])
        assert c.coordinator.last_summary is not None
        assert sorted(c.coordinator.last_summary.accepted) == sorted(c.sent)
        # Each update message was acknowledged once, by the worker that folded it.
        for w in c.workers.values():
            tr = w.transport
            assert isinstance(tr, MemoryTransport)
            acked = [m.payload for m in tr.acked if "/update/" in m.topic]
            assert len(acked) == len(set(acked)) == 2


def test_an_update_ahead_of_its_announcement_is_held_unacknowledged(tmp_path: Path) -> None:
    with Cluster(tmp_path, devices=1) as c:
        w0 = c.workers["w0"]
        held_back = _drain(w0)  # round 1 (its estimate, its announcement) has not reached w0
        assert [m.topic for m in held_back] == [T.estimate, T.round]
        early = c.update("a0", c.announcement(), seed=2)
        w0.transport.inbox.put(early)
        w0.step(*_drain(w0))
        tr = w0.transport
        assert isinstance(tr, MemoryTransport)
        assert early not in tr.acked
        assert w0.machine.accepted == 0
        assert sum(w0.stats.rejected.values()) == 0
        for m in held_back:  # the round arrives
            w0.transport.inbox.put(m)
        w0.step(*_drain(w0))
        assert w0.machine.accepted_ids == (("a0", "a0-2"),)
        assert [m for m in tr.acked if m is early] == [early]  # once, after it was logged
        c.pump()
        assert c.model().version == 1


def test_a_held_update_redelivered_on_its_packet_id_is_acknowledged_once(
        tmp_path: Path) -> None:
    # The engine redelivers an unacknowledged message on its packet id after its ack wait or a
    # reconnect: two PUBACKs for one id could acknowledge a message sent on it since.
    with Cluster(tmp_path, devices=1) as c:
        w0 = c.workers["w0"]
        held_back = _drain(w0)
        early = c.update("a0", c.announcement(), seed=2)
        again = dataclasses.replace(early)  # the redelivered copy: same id, another object
        for m in (early, again):
            w0.transport.inbox.put(m)
            w0.step(*_drain(w0))
        tr = w0.transport
        assert isinstance(tr, MemoryTransport)
        assert not [m for m in tr.acked if m.mid == early.mid]
        for m in held_back:
            w0.transport.inbox.put(m)
        w0.step(*_drain(w0))
        assert w0.machine.accepted_ids == (("a0", "a0-2"),)
        assert len([m for m in tr.acked if m.mid == early.mid]) == 1


def test_a_repeated_collect_gets_the_same_partial_and_later_updates_are_round_closed(
        tmp_path: Path) -> None:
    with Cluster(tmp_path, devices=3) as c:
        ann = c.announcement()
        c.hub.route(c.update("a0", ann, seed=1))
        c.hub.route(c.update("b0", ann, seed=2))
        c.pump()
        w0 = c.workers["w0"]
        req = cluster_wire.CollectRequest(FED, ann.run, ann.round, ann.base_version, WORKERS)
        msg = Message(T.collect, cluster_wire.encode(req), qos=1)
        w0.transport.inbox.put(msg)
        w0.step(*_drain(w0))
        late = c.update("a1", ann, seed=3)
        w0.transport.inbox.put(msg)
        w0.transport.inbox.put(late)
        w0.step(*_drain(w0))
        sent = [m.payload for m in published(w0) if "/partial/" in m.topic]
        assert len(sent) == 2
        assert sent[0] == sent[1]
        assert w0.stats.rejected["round_closed"] == 1
        p = cluster_wire.decode(sent[0])
        assert isinstance(p, cluster_wire.WorkerPartial)
        assert p.contributors == (("a0", "a0-1"),)


def test_a_restarted_worker_answers_with_the_partial_it_had(tmp_path: Path) -> None:
    with Cluster(tmp_path, devices=3) as c:
        ann = c.announcement()
        c.hub.route(c.update("a0", ann, seed=1))
        c.hub.route(c.update("a1", ann, seed=4))
        c.pump()
        w0 = c.workers["w0"]
        req = cluster_wire.CollectRequest(FED, ann.run, ann.round, ann.base_version, WORKERS)
        w0.transport.inbox.put(Message(T.collect, cluster_wire.encode(req), qos=1))
        w0.step(*_drain(w0))
        before = [m.payload for m in published(w0) if "/partial/" in m.topic][-1]
        # SIGKILL: nothing but the state directory survives; the retained collect is there.
        c.hub.retained[T.collect] = Message(T.collect, cluster_wire.encode(req), 1, True)
        again = c.worker("w0")
        assert (again.run, again.round, again.machine.accepted) == (ann.run, ann.round, 2)
        again.step(*_drain(again))
        after = [m.payload for m in published(again) if "/partial/" in m.topic]
        assert after
        assert after[-1] == before


def progress_reports(worker: WorkerService) -> list[cluster_wire.WorkerProgress]:
    out = []
    for m in published(worker):
        if "/wprogress/" in m.topic:
            p = cluster_wire.decode(m.payload)
            assert isinstance(p, cluster_wire.WorkerProgress)
            out.append(p)
    return out


def test_progress_reports_carry_only_new_updates_and_a_restarted_coordinator_asks_again(
        tmp_path: Path) -> None:
    with Cluster(tmp_path, devices=3) as c:
        ann = c.announcement()
        w0 = c.workers["w0"]
        for seed, dev in enumerate(("a0", "a1")):
            c.hub.route(c.update(dev, ann, seed=seed))
            c.pump()
        reports = [p for p in progress_reports(w0) if p.round == ann.round]
        pairs = [pair for p in reports for pair in p.accepted]
        assert [d for d, _ in pairs] == ["a0", "a1"]  # each update in one report only
        assert all(p.first == sum(len(q.accepted) for q in reports[:i])
                   for i, p in enumerate(reports))
        assert c.coordinator.machine.accepted == 2
        # SIGKILL of the coordinator: the restarted one has not seen w0's earlier reports.
        again = CoordinatorService(c.coordinator.config, MemoryTransport(c.hub), clock=c.clock)
        again.start()
        again.stop()
        c.made.append(again)
        c.coordinator = again  # the dead one is never stepped again
        assert (again.round, again.machine.accepted) == (ann.round, 0)
        c.hub.route(c.update("a2", ann, seed=2))
        c.pump()
        asked = [cluster_wire.decode(m.payload) for m in published(again)
                 if m.topic == T.worker_resend("w0")]
        assert [(r.worker, r.first) for r in asked
                if isinstance(r, cluster_wire.ResendRequest)] == [("w0", 0)]
        # w0 reported its round again from 0: quorum (3), the round closed and merged.
        assert c.model().version == 1
        assert again.last_summary is not None
        assert sorted(d for d, _ in again.last_summary.accepted) == ["a0", "a1", "a2"]


def test_partials_that_share_a_device_abandon_the_round(tmp_path: Path) -> None:
    with Cluster(tmp_path, devices=2) as c:
        ann = c.announcement()
        # The same device reaches both workers (a device on two sites): counted twice if merged.
        one = c.update("a0", ann, seed=1)
        c.hub.route(one)
        c.hub.route(Message(f"{T.base}/shard/1/update/a0", one.payload, qos=1, mid=99))
        c.hub.route(c.update("b0", ann, seed=2))
        c.pump()
        assert c.coordinator.stats.abandoned["overlapping_partials"] == 1
        assert c.model().version == 0
        assert c.coordinator.round == 2


def test_cluster_messages_round_trip_and_hostile_bytes_only_raise_decode_error() -> None:
    msgs: list[cluster_wire.ClusterMessage] = [
        cluster_wire.WorkerProgress(FED, "w0", 7, 3, 2, (("d", "u"),), True, {"stale": 1}, 1.5),
        cluster_wire.CollectRequest(FED, 7, 3, 2, ("w0", "w1"), 2.5),
        cluster_wire.WorkerProgress(FED, "w1", 7, 3, 2, (("e", "v"),), norms=(0.5,), first=9),
        cluster_wire.ResendRequest(FED, "w1", 7, 3, 4, 3.5),
        cluster_wire.WorkerPartial(FED, "w1", 7, 3, 2, np.arange(5, dtype=np.float64) / 3,
                                   12.5, (("d", "u"), ("e", "v")), {"duplicate": 2}, 99, 3.5),
    ]
    for m in msgs:
        back = cluster_wire.decode(cluster_wire.encode(m))
        if isinstance(m, cluster_wire.WorkerPartial):
            assert isinstance(back, cluster_wire.WorkerPartial)
            np.testing.assert_array_equal(back.weighted_sum, m.weighted_sum)
            assert dataclasses.replace(back, weighted_sum=m.weighted_sum) == m
        else:
            assert back == m
    rng = random.Random(13)
    outcomes = {"decoded": 0, "refused": 0}
    for _ in range(3000):
        raw = bytearray(cluster_wire.encode(rng.choice(msgs)))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            i = rng.randrange(len(raw))
            if op < 0.5:
                raw[i] = rng.randrange(256)
            elif op < 0.75:
                del raw[i:i + rng.randint(1, 8)]
            else:
                raw[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        try:
            cluster_wire.decode(bytes(raw))
            outcomes["decoded"] += 1
        except DecodeError:
            outcomes["refused"] += 1
    # Anything but DecodeError would have failed the test; both outcomes were exercised.
    assert min(outcomes.values()) > 0


@pytest.mark.parametrize("bad", [
    {"kind": "partial", "size": 3, "sum": b"\0" * 16},
    {"kind": "partial", "total_weight": -1.0},
    {"kind": "wprogress", "accepted": [["d"]]},
    {"kind": "collect", "workers": [1]},
    {"kind": "wprogress", "first": -1},
    {"kind": "wresend", "first": "0"},
    {"kind": "nope"},
])
def test_malformed_cluster_messages_are_refused(bad: dict[str, object]) -> None:
    import msgpack

    good: dict[str, cluster_wire.ClusterMessage] = {
        "partial": cluster_wire.WorkerPartial(FED, "w", 1, 1, 0, np.zeros(3), 1.0, ()),
        "wprogress": cluster_wire.WorkerProgress(FED, "w", 1, 1, 0, ()),
        "collect": cluster_wire.CollectRequest(FED, 1, 1, 0, ("w",)),
        "wresend": cluster_wire.ResendRequest(FED, "w", 1, 1, 0)}
    base = msgpack.unpackb(cluster_wire.encode(good.get(str(bad["kind"]), good["collect"])))
    with pytest.raises(DecodeError):
        cluster_wire.decode(msgpack.packb(base | bad))


@pytest.mark.parametrize("workers", [("w0",), WORKERS])
def test_the_adaptive_norm_bound_is_the_coordinators_and_clips_as_one_aggregator_does(
        tmp_path: Path, workers: tuple[str, ...]) -> None:
    """The estimate (bootstrapped from the first round's norms, then moved each round) is
    computed once, at the coordinator, from every worker's norms; the workers clip with it. One
    worker sums in the single aggregator's order, so the models must be the same bits; two sum
    in another grouping (float64 rounding only), while a worker with its own estimate from half
    the norms would clip differently by far more."""
    devices = [f"{'a' if i % 2 or len(workers) == 1 else 'b'}{i}" for i in range(10)]
    single_hub = MemoryHub()
    single = AggregatorService(base_config(tmp_path / "single", ClusterConfig(), len(devices)),
                               MemoryTransport(single_hub), clock=Clock())
    single.start()
    single.stop()
    with Cluster(tmp_path, devices=len(devices), workers=workers) as c:
        try:
            for round_ in range(1, 4):
                ann = c.announcement()
                for i, dev in enumerate(devices):
                    # Two devices send deltas 20 and 50 times larger each round: clipped.
                    seed = 100 * round_ + i
                    msg = c.update(dev, ann, seed=seed,
                                   scale={3: 50.0, 4: 20.0}.get(i, 1.0 + i / 10))
                    c.hub.route(msg)
                    u = dataclasses.replace(c.sent[(dev, f"{dev}-{seed}")], run=single.run)
                    single.step(Message(T.update(dev), codec.encode(u), qos=1))
                c.pump()
                assert c.model().version == round_ == single.version
                got = decode_all(c.model().tensors)
                want_model = codec.decode(single_hub.retained[T.model].payload)
                assert isinstance(want_model, GlobalModel)
                want = decode_all(want_model.tensors)
                for k in want:
                    if len(workers) == 1:
                        np.testing.assert_array_equal(got[k], want[k])
                    else:
                        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)
                assert c.coordinator.bound.estimate == single.bound.estimate
            assert single.stats.clipped >= 6
            assert sum(w.stats.clipped for w in c.workers.values()) == single.stats.clipped
        finally:
            if single.wal is not None:
                single.wal.close()


def test_a_worker_serves_its_own_prometheus_counters(tmp_path: Path) -> None:
    import time
    import urllib.request

    from fedmq.broker import find_free_port

    with Cluster(tmp_path, devices=3) as c:
        port = find_free_port()
        cfg = dataclasses.replace(
            base_config(None, ClusterConfig(role="worker", name="w0", shards=2, shard=0), 3),
            metrics=MetricsConfig(listen=f"127.0.0.1:{port}"))
        w = WorkerService(cfg, MemoryTransport(c.hub), clock=c.clock)
        w.start()
        try:
            ann = c.announcement()
            c.hub.route(c.update("a0", ann, seed=1))
            c.hub.route(Message(f"{T.base}/shard/0/update/a1", b"not msgpack", qos=1))
            text = ""
            for _ in range(100):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
                    text = r.read().decode()
                if "fedmq_updates_accepted_total 1.0" in text and \
                        'fedmq_updates_rejected_total{reason="malformed"} 1.0' in text:
                    break
                time.sleep(0.05)
            assert "fedmq_updates_accepted_total 1.0" in text
            assert 'fedmq_updates_rejected_total{reason="malformed"} 1.0' in text
        finally:
            w.stop()
