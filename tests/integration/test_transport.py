"""The paho transport against a real Mosquitto: concurrent publishers, broker restarts."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from fedmq import paho_client
from fedmq.broker import MosquittoBroker, default_config_dir
from fedmq.errors import BrokerError
from fedmq.transport import PahoTransport

from fedhelpers import broker_config


def _payload(i: int) -> bytes:
    body = os.urandom(200_000)
    return hashlib.sha256(body).digest() + i.to_bytes(4, "big") + body


@contextlib.contextmanager
def _pair(broker: MosquittoBroker, qos: int = 1,
          ) -> Iterator[tuple[str, PahoTransport, PahoTransport]]:
    """(topic, subscriber, publisher), both connected, stopped on leaving."""
    cfg = broker_config(broker)
    topic = f"t/{uuid.uuid4().hex}"
    sub = PahoTransport(cfg, client_id=f"sub-{uuid.uuid4().hex}")
    sub.subscribe(topic, qos=qos)
    sub.start()
    pub = PahoTransport(cfg, client_id=f"pub-{uuid.uuid4().hex}")
    pub.start()
    try:
        assert sub.wait_connected(10)
        assert pub.wait_connected(10)
        time.sleep(0.2)
        yield topic, sub, pub
    finally:
        pub.stop()
        sub.stop()


@pytest.mark.broker
def test_publishing_from_many_threads_never_corrupts_messages(mosquitto: MosquittoBroker) -> None:
    """Large QoS 1 publishes from several threads at once all arrive intact.

    The e2e benchmark once caught a corrupted update when a hand-rolled loop() thread and the
    publishing thread both wrote to the socket; all writes now go through paho's own thread.
    """
    with _pair(mosquitto) as (topic, sub, pub):
        def send(k: int) -> None:
            for j in range(20):
                pub.publish(topic, _payload(k * 100 + j))

        threads = [threading.Thread(target=send, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seen = set()
        for _ in range(80):
            msg = sub.inbox.get(timeout=20)
            digest, index, body = msg.payload[:32], msg.payload[32:36], msg.payload[36:]
            assert hashlib.sha256(body).digest() == digest, "a message arrived corrupted"
            seen.add(int.from_bytes(index, "big"))
        assert len(seen) == 80


@pytest.mark.broker
def test_reconnects_and_resubscribes_after_a_broker_restart(mosquitto_factory: Any) -> None:
    broker: MosquittoBroker = mosquitto_factory()
    cfg = broker_config(broker)
    sub = PahoTransport(cfg, client_id=f"sub-{uuid.uuid4().hex}", seed=1)
    sub.subscribe("t/restart")
    sub.start()
    try:
        assert sub.wait_connected(10)
        broker.kill()
        deadline = time.monotonic() + 10
        while sub.connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not sub.connected
        broker.restart()
        assert sub.wait_connected(15), sub.last_error
        assert sub.connects == 2
        pub = PahoTransport(cfg, client_id=f"pub-{uuid.uuid4().hex}")
        pub.start()
        assert pub.wait_connected(10)
        time.sleep(0.3)  # the resubscription's SUBACK
        pub.publish("t/restart", b"after")
        assert sub.inbox.get(timeout=10).payload == b"after"
        pub.stop()
    finally:
        sub.stop()


@pytest.mark.broker
def test_oversize_publish_is_refused_before_the_broker_sees_it(mosquitto_factory: Any,
                                                               tmp_path: Any) -> None:
    template = tmp_path / "small.conf"
    template.write_text((default_config_dir() / "dev.conf").read_text()
                        + "\nmax_packet_size 10000\n")
    broker: MosquittoBroker = mosquitto_factory(template)
    t = PahoTransport(broker_config(broker), client_id=f"c-{uuid.uuid4().hex}")
    t.start()
    try:
        assert t.wait_connected(10)
        assert t.max_packet_size == 10000
        with pytest.raises(BrokerError, match="maximum packet size"):
            t.publish("t/x", b"\0" * 20_000)
        t.publish("t/x", b"\0" * 5_000)  # below the limit: fine
    finally:
        t.stop()


@pytest.mark.broker
@pytest.mark.parametrize("qos", [0, 1])
def test_inbound_publishes_take_the_one_copy_path(mosquitto: MosquittoBroker, qos: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages from a real broker are cut by ``split_publish`` and arrive whole and acked."""
    calls = []
    real = paho_client.split_publish

    def counted(packet: bytes | bytearray, q: int, mqtt5: bool) -> Any:
        calls.append(q)
        return real(packet, q, mqtt5)

    monkeypatch.setattr(paho_client, "split_publish", counted)
    with _pair(mosquitto, qos) as (topic, sub, pub):
        sent = [_payload(i) for i in range(5)]
        deliveries = [pub.publish(topic, p, qos=qos) for p in sent]
        got = [sub.inbox.get(timeout=20) for _ in sent]
        assert [m.payload for m in got] == sent
        assert [m.topic for m in got] == [topic] * 5
        assert all(m.qos == qos for m in got)
        deadline = time.monotonic() + 10
        while not all(d.done() for d in deliveries) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert all(d.done() for d in deliveries)
        assert calls.count(qos) == 5
