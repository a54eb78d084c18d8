"""PahoTransport says what it waits for: an unreachable broker, another client on our id."""

from __future__ import annotations

import logging
import time

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from fedmq.broker import MosquittoBroker
from fedmq.config import BrokerConfig
from fedmq.transport import (
    DUPLICATE_REPEAT_S,
    SESSION_TAKEN_OVER,
    WAITING_REPEAT_S,
    PahoTransport,
    describe_connect_error,
)

DUPLICATE = "another client is connected with client id"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _transport(clock: FakeClock, client_id: str = "dev-1") -> PahoTransport:
    t = PahoTransport(BrokerConfig(host="127.0.0.1", port=1), client_id, seed=0)
    t._clock = clock
    return t


def _errors(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.ERROR and text in r.getMessage()]


def test_session_taken_over_is_one_error_line_per_minute(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    t = _transport(clock)
    taken = ReasonCode(PacketTypes.DISCONNECT, identifier=SESSION_TAKEN_OVER)
    with caplog.at_level(logging.INFO, logger="fedmq.transport"):
        for _ in range(5):
            t._connected_at = clock.now
            clock.now += 10.0  # long-lived connections: the reason code alone tells
            t._handle_disconnect(t._client, None, None, taken, None)
        assert t.duplicate_id_seen == 5
        assert _errors(caplog, DUPLICATE) == [
            "another client is connected with client id dev-1 (the broker handed it our "
            "session): every MQTT client needs its own client id"]
        clock.now += DUPLICATE_REPEAT_S
        t._handle_disconnect(t._client, None, None, taken, None)
        assert len(_errors(caplog, DUPLICATE)) == 2


def test_quick_drops_without_a_reason_mean_a_duplicate_only_when_repeated(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    t = _transport(clock)
    lost = ReasonCode(PacketTypes.DISCONNECT, "Unspecified error")

    def drop(after: float) -> None:
        t._connected_at = clock.now
        clock.now += after
        t._handle_disconnect(t._client, None, None, lost, None)

    with caplog.at_level(logging.INFO, logger="fedmq.transport"):
        drop(0.1)
        drop(0.1)
        drop(5.0)  # a connection that lived: the count starts again
        drop(0.1)
        drop(0.1)
        assert _errors(caplog, DUPLICATE) == []
        drop(0.1)
        assert len(_errors(caplog, DUPLICATE)) == 1


def test_waiting_for_the_broker_is_logged_at_once_then_every_30_s(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    t = _transport(clock)
    t._client.connect_error = ConnectionRefusedError(111, "Connection refused")
    with caplog.at_level(logging.INFO, logger="fedmq.transport"):
        for _ in range(10):
            t._handle_connect_fail(t._client, None)
            clock.now += WAITING_REPEAT_S / 4
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines == ["waiting for the broker at 127.0.0.1:1 (connection refused); retrying "
                     "with back-off"] * 3  # at 0, 30 and 60 s of 10 tries over 75 s
    assert t.last_error == "cannot reach 127.0.0.1:1: connection refused"


def test_describe_connect_error() -> None:
    assert describe_connect_error(ConnectionRefusedError(111, "x")) == "connection refused"
    assert describe_connect_error(TimeoutError()) == "timed out"
    assert describe_connect_error(OSError(113, "No route to host")) == "No route to host"


def test_two_clients_with_one_id_on_a_real_broker_say_so_once_each(
        mosquitto: MosquittoBroker, caplog: pytest.LogCaptureFixture) -> None:
    config = BrokerConfig(host="127.0.0.1", port=mosquitto.port)
    first = PahoTransport(config, "fedmq-device-twin", seed=1)
    second = PahoTransport(config, "fedmq-device-twin", seed=2)
    with caplog.at_level(logging.INFO, logger="fedmq.transport"):
        first.start()
        try:
            assert first.wait_connected(5)
            second.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (
                    first.duplicate_id_seen and second.duplicate_id_seen):
                time.sleep(0.05)
            time.sleep(1.0)  # and no further line while they keep fighting
        finally:
            second.stop()
            first.stop()
    assert first.duplicate_id_seen
    assert second.duplicate_id_seen
    errors = _errors(caplog, DUPLICATE)
    assert errors == [
        "another client is connected with client id fedmq-device-twin (the broker handed it "
        "our session): every MQTT client needs its own client id"] * 2
    assert any(r.getMessage() == f"connected to 127.0.0.1:{mosquitto.port} as "
               "fedmq-device-twin" for r in caplog.records)
