"""The device's outbox (device_agent/outbox.py) and how the agent service uses it."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import numpy as np
import pytest

from device_agent import delivery as delivery_module
from device_agent.outbox import Outbox, OutboxFullError
from device_agent.service import AgentService
from device_agent.trainers import MLPTrainer
from fedmq import codec
from fedmq.compression import encode_all
from fedmq.memory_transport import MemoryTransport
from fedmq.models import init_mlp
from fedmq.topics import Topics
from fedmq.transport import Delivery, Message
from fedmq.wire import GlobalModel, ModelUpdate, RoundAnnouncement, model_digest

FED = "fleet"
DEVICE = "sensor-1"
TOPIC = Topics(FED).update(DEVICE)
BIG = 1 << 30


def msgs(group: str, n: int, size: int = 10) -> list[tuple[str, bytes]]:
    return [(TOPIC, f"{group}:{i}:".encode().ljust(size, b".")) for i in range(n)]


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ---------------------------------------------------------------- order and persistence


def test_order_survives_a_new_instance(tmp_path: Path) -> None:
    box = Outbox(tmp_path, BIG, 100)
    k1 = box.put(TOPIC, b"first")
    k2 = box.put_update("u2", msgs("u2", 3))
    k3 = box.put("other/topic", b"last", group="u3")
    expected = [(k1, TOPIC, b"first"),
                *[(k, t, p) for k, (t, p) in zip(k2, msgs("u2", 3), strict=True)],
                (k3, "other/topic", b"last")]
    assert box.pending() == expected
    assert box.pending_keys() == sorted(box.pending_keys())
    again = Outbox(tmp_path, BIG, 100)
    assert again.pending() == expected
    assert len(again) == 5
    assert again.group_of(k2[1]) == "u2"
    # New messages go after the old ones, even across the restart.
    k4 = again.put(TOPIC, b"after restart")
    assert again.pending_keys()[-1] == k4
    assert k4 > k3
    assert Outbox(tmp_path, BIG, 100).pending()[-1] == (k4, TOPIC, b"after restart")


def test_sequence_grows_past_removed_messages(tmp_path: Path) -> None:
    box = Outbox(tmp_path, BIG, 100)
    a = box.put(TOPIC, b"a")
    b = box.put(TOPIC, b"b")
    box.remove(b)
    c = box.put(TOPIC, b"c")
    assert a < b < c
    assert [k for k, _, _ in Outbox(tmp_path, BIG, 100).pending()] == [a, c]


def test_remove(tmp_path: Path) -> None:
    box = Outbox(tmp_path, BIG, 100)
    solo = box.put(TOPIC, b"solo")
    keys = box.put_update("u", msgs("u", 3))
    assert box.remove(solo) is True  # the only message of its update
    assert solo not in box
    assert box.remove(solo) is False  # unknown keys are ignored
    assert box.remove("no such key") is False
    assert box.remove(keys[0]) is False
    assert box.remove(keys[1]) is False
    assert box.remove(keys[2]) is True  # the update is complete
    assert box.pending() == []
    assert len(box) == 0
    assert box.size_bytes == 0
    assert files(tmp_path) == []
    assert Outbox(tmp_path, BIG, 100).pending() == []


def test_an_acknowledged_last_chunk_stays_on_disk_until_its_update_is_done(
        tmp_path: Path) -> None:
    # Its file marks the update as completely written; without it a restart would take the
    # update for one whose write a crash interrupted.
    box = Outbox(tmp_path, BIG, 100)
    keys = box.put_update("u", msgs("u", 3))
    assert box.remove(keys[2]) is False
    assert keys[2] not in box
    assert [k for k, _, _ in box.pending()] == keys[:2]
    assert len(files(tmp_path)) == 3
    assert box.remove(keys[2]) is False  # already acknowledged
    # After a crash now, the update is whole on disk again: at worst one duplicate.
    assert [k for k, _, _ in Outbox(tmp_path, BIG, 100).pending()] == keys
    box.remove(keys[0])
    assert box.remove(keys[1]) is True
    assert files(tmp_path) == []


# ---------------------------------------------------------------- bounds


def test_full_by_count_drops_the_oldest_whole_update(tmp_path: Path) -> None:
    box = Outbox(tmp_path, BIG, 6)
    old = box.put_update("old", msgs("old", 3))
    mid = box.put_update("mid", msgs("mid", 2))
    new = box.put_update("new", msgs("new", 3))  # 8 > 6: "old" goes, all three chunks
    assert box.dropped == 1
    assert box.dropped_messages == 3
    assert box.pending_keys() == mid + new
    assert not any(k in box for k in old)
    assert Outbox(tmp_path, BIG, 6).pending_keys() == mid + new
    assert len(files(tmp_path)) == 5


def test_full_by_bytes_drops_as_many_old_updates_as_needed(tmp_path: Path) -> None:
    box = Outbox(tmp_path, BIG, 100)
    box.put(TOPIC, b"x" * 1000, group="p")  # same header size as "a".."d"
    per_message = box.size_bytes
    box.remove(box.pending_keys()[0])

    box = Outbox(tmp_path, 5 * per_message, 100)
    a = box.put_update("a", msgs("a", 2, size=1000))
    b = box.put_update("b", msgs("b", 2, size=1000))
    assert box.dropped == 0
    c = box.put_update("c", msgs("c", 2, size=1000))  # 6 > 5 messages' worth: drop "a"
    assert box.pending_keys() == b + c
    assert (box.dropped, box.dropped_messages) == (1, 2)
    d = box.put_update("d", msgs("d", 4, size=1000))  # needs "b" and "c" gone
    assert box.pending_keys() == d
    assert (box.dropped, box.dropped_messages) == (3, 6)
    assert a[0] not in box
    assert box.size_bytes == 4 * per_message


def test_an_update_larger_than_the_bounds_is_refused_and_drops_nothing(tmp_path: Path) -> None:
    box = Outbox(tmp_path, BIG, 3)
    keys = box.put_update("kept", msgs("kept", 2))
    with pytest.raises(OutboxFullError):
        box.put_update("huge", msgs("huge", 4))
    with pytest.raises(OutboxFullError):
        Outbox(tmp_path, 100, 3).put(TOPIC, b"x" * 200)
    assert box.pending_keys() == keys
    assert box.dropped == 0


def test_dropping_counts_only_unacknowledged_messages(tmp_path: Path) -> None:
    box = Outbox(tmp_path, BIG, 4)
    old = box.put_update("old", msgs("old", 3))
    box.remove(old[0])
    box.remove(old[2])  # the tail: kept on disk, no longer pending
    box.put_update("new", msgs("new", 3))
    assert (box.dropped, box.dropped_messages) == (1, 1)
    assert len(files(tmp_path)) == 3


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        Outbox(None, 0, 10)
    with pytest.raises(ValueError, match="positive"):
        Outbox(None, 10, 0)


def test_an_update_id_is_stored_once(tmp_path: Path) -> None:
    box = Outbox(tmp_path, BIG, 10)
    box.put_update("u", msgs("u", 1))
    with pytest.raises(ValueError, match="already"):
        box.put_update("u", msgs("u", 1))


# ---------------------------------------------------------------- crash safety


def test_a_leftover_tmp_file_is_ignored(tmp_path: Path) -> None:
    box = Outbox(tmp_path, BIG, 10)
    key = box.put(TOPIC, b"whole")
    # A crash between write and rename leaves a .tmp (possibly truncated) behind.
    (tmp_path / f"{int(key) + 1:020d}.msg.tmp").write_bytes(b"FMQOUT1\n\x00\x01")
    (tmp_path / "notes.txt").write_text("not ours")
    again = Outbox(tmp_path, BIG, 10)
    assert again.pending() == [(key, TOPIC, b"whole")]
    assert again.corrupt == 0
    assert files(tmp_path) == [f"{key}.msg", "notes.txt"]  # tmp cleaned up, the rest left


def test_a_damaged_file_is_discarded_not_sent(tmp_path: Path) -> None:
    box = Outbox(tmp_path, BIG, 10)
    bad = box.put(TOPIC, b"payload that will rot")
    good = box.put(TOPIC, b"fine")
    path = tmp_path / f"{bad}.msg"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    (tmp_path / f"{int(good) + 1:020d}.msg").write_bytes(b"garbage")
    again = Outbox(tmp_path, BIG, 10)
    assert again.pending() == [(good, TOPIC, b"fine")]
    assert again.corrupt == 2
    assert files(tmp_path) == [f"{good}.msg"]


def test_a_half_written_update_is_discarded(tmp_path: Path) -> None:
    box = Outbox(tmp_path, BIG, 10)
    whole = box.put_update("whole", msgs("whole", 2))
    half = box.put_update("half", msgs("half", 3))
    # A crash during the renames: the update's last chunk never made it.
    (tmp_path / f"{half[2]}.msg").unlink()
    again = Outbox(tmp_path, BIG, 10)
    assert again.pending_keys() == whole
    assert again.corrupt == 2
    assert len(files(tmp_path)) == 2


def test_a_file_removed_behind_its_back_is_forgotten(tmp_path: Path) -> None:
    box = Outbox(tmp_path, BIG, 10)
    gone = box.put(TOPIC, b"gone")
    kept = box.put(TOPIC, b"kept")
    (tmp_path / f"{gone}.msg").unlink()
    assert box.pending() == [(kept, TOPIC, b"kept")]
    assert box.corrupt == 1
    assert gone not in box


# ---------------------------------------------------------------- in memory


def test_in_memory_mode_has_the_same_api(tmp_path: Path) -> None:
    box = Outbox(None, BIG, 4)
    a = box.put(TOPIC, b"a")
    u = box.put_update("u", msgs("u", 2))
    assert box.pending() == [(a, TOPIC, b"a"), *[(k, t, p) for k, (t, p)
                                                  in zip(u, msgs("u", 2), strict=True)]]
    assert box.get(a) == (TOPIC, b"a")
    box.put_update("v", msgs("v", 2))  # 5 > 4: the oldest update ("a") goes
    assert a not in box
    assert box.dropped == 1
    box.remove(u[1])
    assert box.remove(u[0]) is True
    assert len(box) == 2
    assert list(tmp_path.iterdir()) == []
    assert box.directory is None


# ---------------------------------------------------------------- the agent service


class FakeTransport:
    """A transport whose connection and acknowledgements the test controls."""

    def __init__(self) -> None:
        self.inbox: queue.Queue[Message] = queue.Queue()
        self.max_packet_size: int | None = None
        self.connected = False
        self.published: list[tuple[str, bytes, FakeDelivery]] = []
        self.seen_in_outbox: list[bool] = []
        self.outbox: Outbox | None = None

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def subscribe(self, topic: str, qos: int = 1) -> None: ...
    def ack(self, msg: Message) -> None: ...

    def wait_connected(self, timeout: float) -> bool:
        return self.connected

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Delivery:
        delivery = FakeDelivery()
        self.published.append((topic, payload, delivery))
        if topic == TOPIC and self.outbox is not None:  # written before it is handed over?
            self.seen_in_outbox.append(any(p == payload for _, _, p in self.outbox.pending()))
        return delivery

    def updates(self) -> list[tuple[bytes, FakeDelivery]]:
        return [(p, d) for t, p, d in self.published if t == TOPIC]

    def ack_all(self) -> None:
        for _, _, d in self.published:
            d.acked = True


class FakeDelivery(Delivery):
    def __init__(self) -> None:
        super().__init__(None)
        self.acked = False

    def done(self) -> bool:
        return self.acked


def make_service(transport: FakeTransport, outbox: Outbox,
                 trained_path: Path | None = None) -> AgentService:
    rng = np.random.default_rng(0)
    trainer = MLPTrainer(rng.normal(size=(12, 64)).astype(np.float32),
                         rng.integers(0, 10, size=12), num_classes=10)
    transport.outbox = outbox
    return AgentService(FED, DEVICE, trainer, transport, clock=lambda: 0.0, outbox=outbox,
                        trained_path=trained_path)


def train_round(service: AgentService, round_: int = 1, max_chunk_bytes: int = 0) -> None:
    """Give the service model ``round_ - 1`` and announce ``round_``: it trains and sends."""
    tensors = encode_all(init_mlp([64, 32, 10], seed=round_))
    version = round_ - 1
    model = GlobalModel(federation=FED, version=version, round=version, tensors=tensors,
                        sha256=model_digest(tensors))
    ann = RoundAnnouncement(federation=FED, round=round_, base_version=version, model_sha256="",
                            deadline=100.0, min_updates=1, max_updates=10,
                            train={"epochs": 1}, sample_seed=0, sample_rate=1.0,
                            max_chunk_bytes=max_chunk_bytes)
    topics = Topics(FED)
    service.handle_message(Message(topics.model, codec.encode(model), qos=1))
    service.handle_message(Message(topics.round, codec.encode(ann), qos=1))


def update_ids(payloads: list[bytes]) -> list[str]:
    return [codec.decode_as(p, ModelUpdate).update_id for p in payloads]


def test_service_writes_before_publishing_and_forgets_once_acknowledged(tmp_path: Path) -> None:
    transport = FakeTransport()
    transport.connected = True
    service = make_service(transport, Outbox(tmp_path, BIG, 100))
    train_round(service, max_chunk_bytes=4096)
    sent = transport.updates()
    assert len(sent) > 2  # chunked
    assert transport.seen_in_outbox == [True] * len(sent)
    assert len(service.outbox) == len(sent)
    service.pump_outbox()
    assert len(service.outbox) == len(sent)  # not acknowledged yet: kept
    transport.ack_all()
    service.pump_outbox()
    assert len(service.outbox) == 0
    assert (service.messages_acked, service.updates_acked) == (len(sent), 1)
    assert files(tmp_path) == []


def test_service_trained_while_disconnected_publishes_on_connect(tmp_path: Path) -> None:
    transport = FakeTransport()
    service = make_service(transport, Outbox(tmp_path, BIG, 100))
    train_round(service)
    assert transport.updates() == []  # nobody to hand it to: kept for the connect
    assert len(service.outbox) == 1
    service.pump_outbox()
    assert transport.updates() == []
    transport.connected = True
    service.on_connected()
    service.pump_outbox()
    assert len(transport.updates()) == 1
    transport.ack_all()
    service.pump_outbox()
    assert len(service.outbox) == 0
    assert service.updates_acked == 1


def test_service_resends_unacknowledged_after_a_reconnect_grace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transport = FakeTransport()
    transport.connected = True
    service = make_service(transport, Outbox(tmp_path, BIG, 100))
    train_round(service)
    assert len(transport.updates()) == 1
    # The connection drops before the PUBACK; paho resends by itself, so the outbox waits.
    transport.connected = False
    service.pump_outbox()
    transport.connected = True
    service.on_connected()
    service.pump_outbox()
    assert len(transport.updates()) == 1
    monkeypatch.setattr(delivery_module, "RESEND_GRACE_S", 0.0)
    service.on_connected()
    service.pump_outbox()  # still no PUBACK after the grace: published again
    (first, _), (second, _) = transport.updates()
    assert first == second
    assert service.messages_resent == 1
    transport.ack_all()
    service.pump_outbox()
    assert len(service.outbox) == 0
    assert service.messages_acked == 1  # the latest copy's acknowledgement counts


def test_an_update_published_after_the_connect_is_not_resent_while_its_ack_is_due(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The demo once turned away a dozen duplicates: when the grace after the first connect
    # ran out, the outbox republished updates whose PUBACK was merely still on its way.
    monkeypatch.setattr(delivery_module, "RESEND_GRACE_S", 0.05)
    transport = FakeTransport()
    transport.connected = True
    service = make_service(transport, Outbox(tmp_path, BIG, 100))
    service.on_connected()
    service.pump_outbox()  # the grace starts
    train_round(service)  # published on this connection; no PUBACK yet
    time.sleep(0.06)
    service.pump_outbox()  # the grace is over: only earlier connections' messages are resent
    assert len(transport.updates()) == 1
    assert service.messages_resent == 0
    transport.ack_all()
    service.pump_outbox()
    assert len(service.outbox) == 0


def test_a_new_service_on_the_same_outbox_resends_what_is_pending(tmp_path: Path) -> None:
    first = FakeTransport()
    first.connected = True
    old = make_service(first, Outbox(tmp_path, BIG, 100))
    train_round(old, max_chunk_bytes=4096)
    sent = [p for p, _ in first.updates()]
    first.updates()[0][1].acked = True  # the first chunk was acknowledged, the rest not
    old.stop()  # or a crash: the outbox is on disk either way

    second = FakeTransport()
    second.connected = True
    new = make_service(second, Outbox(tmp_path, BIG, 100))
    new.start()
    try:
        for _ in range(100):
            if second.updates():
                break
            time.sleep(0.02)
    finally:
        new.stop()
    again = [p for p, _ in second.updates()]
    assert again == sent[1:]
    assert set(update_ids(again)) == set(update_ids(sent))
    assert new.messages_resent == len(sent) - 1


def test_an_update_larger_than_the_outbox_is_still_sent(tmp_path: Path) -> None:
    transport = FakeTransport()
    transport.connected = True
    service = make_service(transport, Outbox(tmp_path, 100, 100))
    train_round(service)
    assert len(transport.updates()) == 1
    assert service.updates_unbuffered == 1
    assert len(service.outbox) == 0


def test_a_dropped_update_is_forgotten_by_the_service(tmp_path: Path) -> None:
    transport = FakeTransport()
    transport.connected = True
    service = make_service(transport, Outbox(tmp_path, BIG, 1))
    train_round(service, round_=1)
    (first, _), = transport.updates()
    train_round(service, round_=2)  # the outbox holds one message: round 1's goes
    assert service.outbox.dropped == 1
    assert update_ids([p for _, _, p in service.outbox.pending()]) == \
        update_ids([transport.updates()[1][0]])
    transport.ack_all()
    service.pump_outbox()
    assert len(service.outbox) == 0
    assert service.updates_acked == 1
    assert update_ids([first]) != update_ids([transport.updates()[1][0]])


def test_memory_transport_deliveries_are_done() -> None:
    assert MemoryTransport().publish("a/b", b"x").done()
    assert Delivery(None).done()


def test_a_restarted_device_does_not_train_the_same_round_again(tmp_path: Path) -> None:
    # Before: the restarted device resent its pending update from the outbox *and* trained the
    # still-open round again; the aggregator turned the second update away as a duplicate.
    record = tmp_path / "trained.json"
    first = FakeTransport()
    first.connected = True
    old = make_service(first, Outbox(tmp_path / "outbox", BIG, 100), record)
    train_round(old, round_=3)
    assert len(first.updates()) == 1
    assert record.exists()

    second = FakeTransport()
    second.connected = True
    new = make_service(second, Outbox(tmp_path / "outbox", BIG, 100), record)
    train_round(new, round_=3)  # the same announcement, after the restart
    assert second.updates() == []  # not trained again (the outbox resends the first one)
    assert new.ignored["trained_before_restart"] == 1
    train_round(new, round_=4)  # the next round is trained as usual
    assert [codec.decode_as(p, ModelUpdate).round for p, _ in second.updates()] == [4]


def test_a_new_run_with_the_same_round_and_model_is_trained(tmp_path: Path) -> None:
    # A fresh aggregator run announces round 1 on the same initial model again; only its
    # deadline differs, and that is enough for the device to take part.
    record = tmp_path / "trained.json"
    record.write_text('{"round": 3, "base_version": 2, "model_sha256": "", "deadline": 99.0}')
    transport = FakeTransport()
    transport.connected = True
    service = make_service(transport, Outbox(tmp_path / "outbox", BIG, 100), record)
    train_round(service, round_=3)  # announced with deadline 100.0
    assert len(transport.updates()) == 1


@pytest.mark.parametrize("content", [
    b"", b"{", b'{"round": "3"}', b"[1, 2, 3]",
    b'{"round": 3, "base_version": 2, "model_sha256": 7, "deadline": 100.0}',
    b'{"round": 3, "base_version": 2, "model_sha256": "", "deadline": "100"}'])
def test_a_damaged_trained_record_is_ignored(tmp_path: Path, content: bytes) -> None:
    record = tmp_path / "trained.json"
    record.write_bytes(content)
    transport = FakeTransport()
    transport.connected = True
    service = make_service(transport, Outbox(tmp_path / "outbox", BIG, 100), record)
    train_round(service, round_=3)
    assert len(transport.updates()) == 1
