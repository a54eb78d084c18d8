"""``[broker] failover``: after a failed connect or a lost connection, PahoTransport tries the
next node of a clustered broker (real Mosquittos here; a NATS cluster in
tests/cluster/test_nats_engine.py)."""

from __future__ import annotations

import socket
import time

from conftest import MosquittoFactory

from fedmq.config import BrokerConfig
from fedmq.transport import PahoTransport

WAIT_S = 20.0  # a bound for a hang, not a timing assertion


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again on leaving: nothing listens there


def _transport(host: str, port: int, failover: list[str], client_id: str) -> PahoTransport:
    return PahoTransport(BrokerConfig(host=host, port=port, failover=failover,
                                      reconnect_min_s=0.05, reconnect_max_s=0.2),
                         client_id, quiet=True)


def test_an_unreachable_first_node_fails_over_to_the_next(
        mosquitto_factory: MosquittoFactory) -> None:
    b = mosquitto_factory()
    t = _transport("127.0.0.1", _closed_port(), [f"{b.host}:{b.port}"], "fo-1")
    try:
        t.start()
        assert t.wait_connected(WAIT_S)
        assert t.address == f"{b.host}:{b.port}"
    finally:
        t.stop()


def test_a_lost_node_moves_the_session_to_the_next_and_subscriptions_follow(
        mosquitto_factory: MosquittoFactory) -> None:
    a, b = mosquitto_factory(), mosquitto_factory()
    t = _transport(a.host, a.port, [f"{b.host}:{b.port}"], "fo-2")
    pub = PahoTransport(BrokerConfig(host=b.host, port=b.port), "fo-pub", quiet=True)
    try:
        t.subscribe("fo/x", 1)
        t.start()
        assert t.wait_connected(WAIT_S)
        assert t.address == f"{a.host}:{a.port}"
        a.stop()
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and not (
                t.address == f"{b.host}:{b.port}" and t.connected and t.subacks >= 2):
            time.sleep(0.02)
        assert t.address == f"{b.host}:{b.port}"
        assert t.subacks >= 2  # subscribed again on the new node
        pub.start()
        assert pub.wait_connected(WAIT_S)
        pub.publish("fo/x", b"on b", qos=1)
        msg = t.inbox.get(timeout=WAIT_S)
        assert (msg.topic, msg.payload) == ("fo/x", b"on b")
    finally:
        pub.stop()
        t.stop()
