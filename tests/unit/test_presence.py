"""Presence: devices online by their latest retained status, and how the aggregator routes it."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.presence import Presence
from aggregator.service import AggregatorService
from fedmq import codec
from fedmq.config import AggregatorConfig, DurabilityConfig, ModelConfig
from fedmq.memory_transport import MemoryTransport
from fedmq.topics import Topics
from fedmq.transport import Message
from fedmq.wire import DeviceStatus

FED = "presence-test"
TOPICS = Topics(FED)


def status(device: str, state: str, ts: float = 0.0, federation: str = FED) -> bytes:
    return codec.encode(DeviceStatus(federation=federation, device_id=device, state=state,
                                     agent_version="1", ts=ts))


def test_counts_follow_each_devices_latest_state() -> None:
    p = Presence(FED)
    p.receive("a", status("a", "online"), now=1.0)
    p.receive("b", status("b", "training"), now=1.0)
    p.receive("c", status("c", "online"), now=1.0)
    assert (p.online, p.offline) == (3, 0)
    p.receive("c", status("c", "offline"), now=2.0)
    p.receive("b", status("b", "online"), now=2.0)
    assert (p.online, p.offline) == (2, 1)
    assert p.devices["c"].state == "offline"
    assert p.devices["c"].received == 2.0
    assert not p.ignored


def test_arrival_order_wins_over_ts() -> None:
    # A last will carries the time its connection was made: older than the online it follows.
    p = Presence(FED)
    p.receive("a", status("a", "online", ts=100.0), now=1.0)
    p.receive("a", status("a", "offline", ts=50.0), now=2.0)
    assert (p.online, p.offline) == (0, 1)
    assert p.devices["a"].ts == 50.0


def test_an_empty_retained_payload_forgets_the_device() -> None:
    p = Presence(FED)
    p.receive("a", status("a", "offline"), now=1.0)
    p.receive("a", b"", now=2.0)
    p.receive("never-seen", b"", now=2.0)
    assert (p.online, p.offline, p.devices) == (0, 0, {})


@pytest.mark.parametrize(
    ("device", "payload", "reason"),
    [
        ("a", b"\x93not msgpack\xc1", "malformed"),
        ("a", b"\x00" * 5000, "malformed"),  # over the size a status can have
        ("a", codec.encode(DeviceStatus(FED, "a", "online")).replace(b"online", b"onlin!"),
         "malformed"),
        ("a", status("b", "online"), "wrong_device"),
        (None, status("a", "online"), "wrong_device"),
        ("a", status("a", "online", federation="other"), "wrong_federation"),
    ],
)
def test_bad_status_messages_are_counted_not_raised(device: str | None, payload: bytes,
                                                    reason: str) -> None:
    p = Presence(FED)
    p.receive(device, payload, now=1.0)
    assert dict(p.ignored) == {reason: 1}
    assert (p.online, p.offline, p.devices) == (0, 0, {})


def test_at_most_max_devices_are_tracked() -> None:
    p = Presence(FED, max_devices=2)
    for device in ("a", "b", "c"):
        p.receive(device, status(device, "online"), now=1.0)
    p.receive("a", status("a", "offline"), now=2.0)  # a known device still changes
    assert (p.online, p.offline) == (1, 1)
    assert dict(p.ignored) == {"full": 1}


def test_the_aggregator_routes_statuses_to_presence_and_acks_them(tmp_path: Path) -> None:
    # Durable mode: manual acks, so a status message must be acknowledged like any other.
    config = AggregatorConfig(federation=FED, model=ModelConfig(layers=[4, 3], seed=1),
                              durability=DurabilityConfig(state_dir=str(tmp_path)))
    transport = MemoryTransport()
    agg = AggregatorService(config, transport)
    msgs = [Message(TOPICS.status("a"), status("a", "online"), qos=1, retain=True, mid=1),
            Message(TOPICS.status("b"), status("b", "offline"), qos=1, retain=True, mid=2),
            Message(TOPICS.status("c"), b"garbage", qos=1, mid=3),
            Message(f"{TOPICS.base}/status/", status("a", "online"), qos=1, mid=4)]
    agg.step(*msgs)
    assert (agg.presence.online, agg.presence.offline) == (1, 1)
    assert dict(agg.presence.ignored) == {"malformed": 1, "wrong_device": 1}
    assert transport.acked == msgs
    assert not agg.stats.rejected
    assert agg.stats.bytes_in == 0


def test_joins_and_leaves_are_logged_and_a_burst_is_summed_up(
        caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from aggregator.presence import LOG_EACH, LOG_WINDOW_S

    presence = Presence("f")
    caplog.set_level(logging.INFO, logger="aggregator.service")
    for i in range(LOG_EACH + 5):
        presence.update(DeviceStatus("f", f"d{i}", "online", "0.1.0"), f"d{i}", 100.0)
    presence.update(DeviceStatus("f", "d0", "training"), "d0", 100.5)  # no change of presence
    presence.update(DeviceStatus("f", "d1", "offline"), "d1", 101.0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "device d0 joined (agent 0.1.0); 1 online"
    assert len(lines) == LOG_EACH
    presence.tick(100.0 + LOG_WINDOW_S)
    assert caplog.records[-1].getMessage() == (
        f"in the last {LOG_WINDOW_S:.0f} s also 5 more joined, 1 more left; {LOG_EACH + 4} "
        "devices online, 1 offline")
    presence.update(DeviceStatus("f", "d2", "offline"), "d2", 112.0)
    assert caplog.records[-1].getMessage() == (
        f"device d2 left (offline status or last will); {LOG_EACH + 3} online")
