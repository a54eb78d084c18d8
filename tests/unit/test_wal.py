"""The write-ahead log, snapshots, and an aggregator that recovers from them."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import numpy as np
import pytest

from aggregator.service import AggregatorService
from aggregator.wal import REJECT, TICK, UPDATE, Snapshot, WriteAheadLog, read_segment
from fedmq import codec, compression
from fedmq.chunking import split_update
from fedmq.config import (
    AggregatorConfig,
    DurabilityConfig,
    ModelConfig,
    RoundsConfig,
    StrategyConfig,
)
from fedmq.memory_transport import MemoryHub, MemoryTransport
from fedmq.transport import Message
from fedmq.wire import GlobalModel, ModelUpdate, RoundSummary


def test_records_round_trip_and_survive_a_new_instance(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, segment=3)
    wal.append(UPDATE, 1.5, "a/b", b"payload")
    wal.append(TICK, 2.5)
    wal.sync()
    wal.close()
    got = list(WriteAheadLog(tmp_path, segment=3).records(3))
    assert [(r.kind, r.now, r.topic, r.payload) for r in got] == [
        (UPDATE, 1.5, "a/b", b"payload"), (TICK, 2.5, "", b"")]


def test_unsynced_records_are_not_on_disk(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.append(UPDATE, 1.0, "t", b"x")
    assert list(wal.records(0)) == []
    wal.sync()
    assert len(list(wal.records(0))) == 1
    wal.append(UPDATE, 2.0, "t", b"y")
    wal.drop()
    assert len(list(wal.records(0))) == 1


@pytest.mark.parametrize("cut", [1, 4, 9, 20])
def test_a_torn_tail_is_ignored(tmp_path: Path, cut: int) -> None:
    wal = WriteAheadLog(tmp_path)
    for i in range(3):
        wal.append(UPDATE, float(i), "t", bytes([i]) * 10)
    wal.close()
    path = next(tmp_path.glob("wal-*.log"))
    path.write_bytes(path.read_bytes()[:-cut])
    assert [r.now for r in read_segment(path)] == [0.0, 1.0]


def test_a_corrupt_record_ends_the_segment(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    for i in range(3):
        wal.append(UPDATE, float(i), "t", b"abcdef")
    wal.close()
    path = next(tmp_path.glob("wal-*.log"))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert [r.now for r in read_segment(path)] == [0.0]


def test_lazy_records_wait_for_one_that_must_be_written(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    wal.append(REJECT, 1.0, "malformed", lazy=True)
    wal.sync()
    assert wal.synced_bytes == 0  # a lazy record alone costs no write and no fsync
    assert not (tmp_path / "wal-00000000.log").exists()
    wal.append(UPDATE, 2.0, "t", b"x")
    wal.sync()
    segment = tmp_path / "wal-00000000.log"
    assert [(r.kind, r.topic) for r in read_segment(segment)] == [
        (REJECT, "malformed"), (UPDATE, "t")]
    wal.append(REJECT, 3.0, "stale", lazy=True)
    wal.close()  # closing (like rotating) writes lazy records too
    assert [r.kind for r in read_segment(segment)] == [REJECT, UPDATE, REJECT]


def test_rotate_deletes_older_segments(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path, segment=1)
    wal.append(UPDATE, 1.0, "t", b"x")
    wal.rotate(2)
    wal.append(UPDATE, 2.0, "t", b"y")
    wal.close()
    assert wal.segments() == [2]
    assert [r.payload for r in wal.records(0)] == [b"y"]


def test_snapshot_is_atomic_and_round_trips(tmp_path: Path) -> None:
    assert Snapshot.load(tmp_path) is None
    model = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
    Snapshot(model, {"version": 4, "round": 5}).save(tmp_path)
    (tmp_path / "snapshot.npz.tmp").write_bytes(b"half-written garbage")  # a crash mid-save
    snap = Snapshot.load(tmp_path)
    assert snap is not None
    assert snap.meta["version"] == 4
    assert list(snap.model) == ["w", "b"]
    np.testing.assert_array_equal(snap.model["w"], model["w"])


# ---------------------------------------------------------------- recovery

FED = "wal"
DEVICES = 4


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _config(state_dir: Path, every: int = 0, strategy: str = "fedavg") -> AggregatorConfig:
    return AggregatorConfig(
        federation=FED, model=ModelConfig(layers=[6, 4, 3], seed=2),
        rounds=RoundsConfig(min_updates=DEVICES, max_updates=DEVICES, deadline_s=600.0,
                            max_rounds=0),
        durability=DurabilityConfig(state_dir=str(state_dir), snapshot_every_updates=every,
                                    snapshot_every_s=0),
        strategy=StrategyConfig(name=strategy))  # type: ignore[arg-type]


def _updates(rounds: int, chunked: bool = False) -> list[list[Message]]:
    """Deterministic updates whose weighted sums are exact in float64 (any order)."""
    rng = np.random.default_rng(0)
    shapes = {"dense0.weight": (6, 4), "dense0.bias": (4,), "dense1.weight": (4, 3),
              "dense1.bias": (3,)}
    out = []
    for r in range(1, rounds + 1):
        msgs: list[Message] = []
        for d in range(DEVICES):
            delta = {k: (rng.integers(-64, 64, s) / 1024).astype(np.float32)
                     for k, s in shapes.items()}
            u = ModelUpdate(federation=FED, device_id=f"d{d}", round=r, base_version=r - 1,
                            update_id=uuid.UUID(int=r * 100 + d).hex, num_examples=1 + d,
                            tensors=compression.encode_all(delta))
            parts = (split_update(u, delta, compression.encode, 4096 + 100 * (d % 2))
                     if chunked else [u])
            msgs.extend(Message(f"fedmq/v1/{FED}/update/d{d}", codec.encode(p), qos=1)
                        for p in parts)
        out.append(msgs)
    return out


def _run(state_dir: Path, hub: MemoryHub, clock: Clock, every: int = 0,
         strategy: str = "fedavg") -> AggregatorService:
    agg = AggregatorService(_config(state_dir, every, strategy), MemoryTransport(hub), clock=clock)
    agg.start()
    agg.stop()  # drive it by hand: step() below
    return agg


def _final_model(agg: AggregatorService) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in agg.model.items()}


@pytest.mark.parametrize(
    ("every", "chunked", "strategy"),
    [(0, False, "fedavg"), (1, False, "fedavg"), (3, False, "fedavg"), (2, True, "fedavg"),
     (0, False, "fedadam"), (1, False, "fedyogi"), (2, True, "fedavgm")],
    ids=["round-snapshots", "snapshot-each-update", "snapshot-every-3",
         "chunked-snapshot-every-2", "fedadam-round-snapshots", "fedyogi-snapshot-each-update",
         "fedavgm-chunked-snapshot-every-2"])
def test_crash_anywhere_gives_the_reference_model(tmp_path: Path, every: int, chunked: bool,
                                                  strategy: str) -> None:
    rounds = _updates(3, chunked)
    reference = _run(tmp_path / "ref", MemoryHub(), Clock(), strategy=strategy)
    for msgs in rounds:
        reference.step(*msgs)
    assert reference.version == 3
    flat = [m for msgs in rounds for m in msgs]
    # Crash after every possible number of handled updates, restart on the same state.
    for crash_after in range(1, len(flat)):
        state = tmp_path / f"s{crash_after}"
        hub, clock = MemoryHub(), Clock()
        first = _run(state, hub, clock, every, strategy)
        for m in flat[:crash_after]:
            first.step(m)
        # kill -9: no stop(), no final snapshot; only what step() synced survives.
        assert first.wal is not None
        first.wal.drop()
        second = _run(state, hub, clock, every, strategy)
        assert second.version == first.version
        # The broker redelivers what it was not sure we got: here, the last message again.
        second.step(flat[crash_after - 1])
        for m in flat[crash_after:]:
            second.step(m)
        assert second.version == 3
        # Mid-round it is a duplicate; if its round has closed since, it is stale. Never folded.
        assert sum(second.stats.rejected.values()) == 1
        assert set(second.stats.rejected) <= {"duplicate", "stale"}
        assert second.stats.rejected["stale"] == (first.version > 0 and not first.machine.accepted
                                                  and not first._pending)
        for name, value in _final_model(reference).items():
            np.testing.assert_array_equal(second.model[name], value)
        for key, value in reference.strategy.state().items():  # the moments, bit for bit
            np.testing.assert_array_equal(second.strategy.state()[key], value)
        summaries = [codec.decode(p.payload) for p in second.transport.published  # type: ignore[attr-defined]
                     if p.topic.endswith("/metrics")]
        assert all(isinstance(s, RoundSummary) for s in summaries)
        assert second.wal is not None
        second.wal.close()
    assert reference.wal is not None
    reference.wal.close()


def test_messages_are_acked_only_after_the_log_sync(tmp_path: Path) -> None:
    hub, clock = MemoryHub(), Clock()
    agg = _run(tmp_path, hub, clock)
    synced: list[int] = []
    assert agg.wal is not None
    real_sync = agg.wal.sync

    def sync(force: bool = False) -> None:
        real_sync(force)
        synced.append(len(agg.transport.acked))  # type: ignore[attr-defined]

    agg.wal.sync = sync  # type: ignore[method-assign]
    msgs = _updates(1)[0][:2]
    agg.step(*msgs)
    assert synced[0] == 0  # nothing was acked before the sync
    assert agg.transport.acked == msgs  # type: ignore[attr-defined]
    agg.wal.close()


class CrashError(Exception):
    """kill -9 at this point."""


@pytest.mark.parametrize("strategy", ["fedadam", "fedavgm"])
def test_a_round_closed_again_by_the_replay_gives_the_same_model_and_moments(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strategy: str) -> None:
    rounds = _updates(3)
    reference = _run(tmp_path / "ref", MemoryHub(), Clock(), strategy=strategy)
    for msgs in rounds:
        reference.step(*msgs)
    hub, clock = MemoryHub(), Clock()
    first = _run(tmp_path / "s", hub, clock, strategy=strategy)
    for m in [*rounds[0], *rounds[1][:-1]]:
        first.step(m)
    save = Snapshot.save

    def crash_before_round_3(snap: Snapshot, directory: Path) -> None:
        if snap.meta["round"] == 3:
            raise CrashError  # round 2 is closed and published, its snapshot not yet written
        save(snap, directory)

    monkeypatch.setattr(Snapshot, "save", crash_before_round_3)
    with pytest.raises(CrashError):
        first.step(rounds[1][-1])
    assert first.version == 2
    assert first.wal is not None
    first.wal.drop()
    monkeypatch.setattr(Snapshot, "save", save)
    # From round 2's opening snapshot (the moments after round 1), the replay closes round 2
    # again: finalize and commit run once more and must land on the same bits.
    second = _run(tmp_path / "s", hub, clock, strategy=strategy)
    assert second.version == 2
    for key, value in first.strategy.state().items():
        np.testing.assert_array_equal(second.strategy.state()[key], value)
    second.step(rounds[1][-1])  # redelivered: stale now
    second.step(*rounds[2])
    assert second.version == 3
    for name, value in _final_model(reference).items():
        np.testing.assert_array_equal(second.model[name], value)
    for key, value in reference.strategy.state().items():
        np.testing.assert_array_equal(second.strategy.state()[key], value)
    for agg in (reference, second):
        assert agg.wal is not None
        agg.wal.close()


def test_a_new_strategy_on_old_state_starts_its_moments_afresh(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hub, clock = MemoryHub(), Clock()
    first = _run(tmp_path, hub, clock, strategy="fedadam")
    first.step(*_updates(1)[0])
    assert first.wal is not None
    first.wal.close()
    assert np.any(first.strategy.state()["m"])
    second = _run(tmp_path, hub, clock, strategy="fedyogi")
    assert "written with [strategy] name = 'fedadam', the config says 'fedyogi'" in caplog.text
    assert second.version == 1
    np.testing.assert_array_equal(second.strategy.state()["m"], 0.0)
    np.testing.assert_array_equal(second.strategy.state()["v"], 1e-3**2)
    assert second.wal is not None
    second.wal.close()


def test_recovery_refuses_a_state_dir_of_another_model(tmp_path: Path) -> None:
    first = _run(tmp_path, MemoryHub(), Clock())
    assert first.wal is not None
    first.wal.close()
    other = dataclasses.replace(_config(tmp_path), model=ModelConfig(layers=[5, 3], seed=0))
    agg = AggregatorService(other, MemoryTransport(MemoryHub()), clock=Clock())
    with pytest.raises(Exception, match="does not match"):
        agg.start()


def test_model_is_republished_after_recovery(tmp_path: Path) -> None:
    hub, clock = MemoryHub(), Clock()
    first = _run(tmp_path, hub, clock)
    for m in _updates(1)[0]:
        first.step(m)
    assert first.wal is not None
    first.wal.drop()
    second = _run(tmp_path, hub, clock)
    assert second.wal is not None
    second.wal.close()
    models = [codec.decode(p.payload) for p in second.transport.published  # type: ignore[attr-defined]
              if p.topic.endswith("/model")]
    assert isinstance(models[-1], GlobalModel)
    assert models[-1].version == 1
    # Recovery resumes the run: the same run id, so running agents take the model as newer.
    assert first.run > 0
    assert second.run == first.run
    assert models[-1].run == first.run


@pytest.mark.parametrize("every", [0, 1], ids=["round-snapshot", "snapshot-each-update"])
def test_rejections_before_a_crash_count_once_in_the_round_summary(tmp_path: Path,
                                                                   every: int) -> None:
    good = _updates(1)[0]
    junk = Message(f"fedmq/v1/{FED}/update/d0", b"\xc1 not msgpack", qos=1)
    elsewhere = Message(f"fedmq/v1/{FED}/update/d3", good[0].payload, qos=1)  # d0's update
    hub, clock = MemoryHub(), Clock()
    first = _run(tmp_path, hub, clock, every)
    assert first.wal is not None
    first.step(junk)
    first.step(elsewhere)
    assert first.wal.synced_bytes == 0  # rejections alone: no fsync
    first.step(good[0])  # written (and synced) with this accepted update
    first.step(good[1])
    first.wal.drop()  # kill -9
    second = _run(tmp_path, hub, clock, every)
    second.step(good[2])
    second.step(good[3])
    assert second.version == 1
    summaries = [codec.decode_as(m.payload, RoundSummary)
                 for m in second.transport.published  # type: ignore[attr-defined]
                 if m.topic.endswith("/metrics")]
    assert [(s.round, s.participants, dict(s.rejected)) for s in summaries] == [
        (1, DEVICES, {"malformed": 1, "wrong_device": 1})]
    assert second.wal is not None
    second.wal.close()
