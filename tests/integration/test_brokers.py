"""Both brokers start, speak MQTT, free their port on stop; production.conf works as written.

The MQTT packets are built by hand (MQTT 3.1.1, section 3) so these tests depend on no client
library and pin the broker facts fedmq relies on: QoS 1, retained messages, last will.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from conftest import MosquittoFactory, require_mosquitto

from aggregator.service import AggregatorService
from fedmq import paho_client
from fedmq.acl import render_acl
from fedmq.broker import (
    EmbeddedBroker,
    MosquittoBroker,
    default_config_dir,
    start_broker,
)
from fedmq.config import (
    AggregatorConfig,
    BrokerConfig,
    DurabilityConfig,
    ModelConfig,
    RoundsConfig,
)
from fedmq.errors import AlreadyRunningError, BrokerError
from fedmq.subscriber import ModelSubscriber
from fedmq.transport import PahoTransport

from fedhelpers import running_aggregator, update_payload, weights_of

pytestmark = pytest.mark.broker

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, DISCONNECT = 1, 2, 3, 4, 8, 9, 14
MQTT_311, MQTT_5 = 4, 5
SILENCE_S = 0.5  # how long "nothing arrives" is watched for


# --- MQTT packets by hand ------------------------------------------------------------------------


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack(">H", len(data)) + data


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + _remaining_length(len(body)) + body


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


def connect_packet(
    client_id: str,
    *,
    level: int = MQTT_311,
    keepalive: int = 30,
    clean: bool = True,
    username: str | None = None,
    password: str | None = None,
    will: Will | None = None,
) -> bytes:
    flags = 0x02 if clean else 0
    payload = _utf8(client_id)
    if will is not None:
        flags |= 0x04 | will.qos << 3 | (0x20 if will.retain else 0)
        payload += _utf8(will.topic) + _utf8(will.payload)
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
    if password is not None:
        flags |= 0x40
        payload += _utf8(password)
    header = _utf8("MQTT") + bytes([level, flags]) + struct.pack(">H", keepalive)
    if level == MQTT_5:
        header += b"\x00"  # no properties
    return _packet(CONNECT << 4, header + payload)


def publish_packet(
    topic: str, payload: bytes, *, qos: int = 0, retain: bool = False, packet_id: int = 1
) -> bytes:
    body = _utf8(topic) + (struct.pack(">H", packet_id) if qos else b"") + payload
    return _packet(PUBLISH << 4 | qos << 1 | int(retain), body)


def subscribe_packet(topic_filter: str, qos: int = 1, packet_id: int = 1) -> bytes:
    return _packet(
        SUBSCRIBE << 4 | 0x02, struct.pack(">H", packet_id) + _utf8(topic_filter) + bytes([qos])
    )


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class RawClient:
    """One MQTT connection over a plain (or TLS) socket, driven packet by packet."""

    # Every socket opened, closed by an autouse fixture even when a test fails half-way:
    # a leaked socket is a ResourceWarning, which filterwarnings=error makes a failure elsewhere.
    opened: ClassVar[list[RawClient]] = []

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # PUBLISHes read while waiting for something else (amqtt pushes retained messages early)
        self._pending: list[Publish] = []

    @classmethod
    def open(cls, host: str, port: int, tls: ssl.SSLContext | None = None) -> RawClient:
        sock = socket.create_connection((host, port), timeout=5)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="localhost")
        client = cls(sock)
        cls.opened.append(client)
        return client

    def close(self) -> None:
        self.sock.close()

    def _read_exactly(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("broker closed the connection")
            data += chunk
        return bytes(data)

    def read_packet(self) -> tuple[int, bytes]:
        """Return (first byte, body) of the next packet."""
        first = self._read_exactly(1)[0]
        length, shift = 0, 0
        while True:
            digit = self._read_exactly(1)[0]
            length |= (digit & 0x7F) << shift
            shift += 7
            if not digit & 0x80:
                break
        return first, self._read_exactly(length)

    def connect(
        self,
        client_id: str,
        *,
        level: int = MQTT_311,
        clean: bool = True,
        username: str | None = None,
        password: str | None = None,
        will: Will | None = None,
    ) -> tuple[bool, int]:
        """CONNECT; return (session present, return or reason code) from the CONNACK."""
        packet = connect_packet(
            client_id, level=level, clean=clean, username=username, password=password, will=will
        )
        self.sock.sendall(packet)
        first, body = self.read_packet()
        assert first >> 4 == CONNACK, f"expected CONNACK, got packet type {first >> 4}"
        return bool(body[0] & 0x01), body[1]

    def publish_qos1(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.sock.sendall(publish_packet(topic, payload, qos=1, retain=retain, packet_id=7))
        while True:
            first, body = self.read_packet()
            if first >> 4 == PUBACK:
                assert body == struct.pack(">H", 7)
                return
            self._pending.append(self._decode_publish(first, body))  # e.g. our own, echoed

    def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        """SUBSCRIBE; return the granted QoS (0x80 = refused)."""
        self.sock.sendall(subscribe_packet(topic_filter, qos, packet_id=3))
        while True:
            first, body = self.read_packet()
            if first >> 4 == SUBACK:
                assert body[:2] == struct.pack(">H", 3)
                return body[2]
            self._pending.append(self._decode_publish(first, body))

    def _decode_publish(self, first: int, body: bytes) -> Publish:
        assert first >> 4 == PUBLISH, f"expected PUBLISH, got packet type {first >> 4}"
        qos = first >> 1 & 0x03
        (topic_len,) = struct.unpack(">H", body[:2])
        topic = body[2 : 2 + topic_len].decode()
        rest = body[2 + topic_len :]
        if qos:
            self.sock.sendall(_packet(PUBACK << 4, rest[:2]))
            rest = rest[2:]
        return Publish(topic, rest, qos, bool(first & 0x01))

    def next_publish(self, topic: str, timeout: float = 5.0) -> Publish | None:
        """The next PUBLISH on ``topic`` (others are skipped), or None after ``timeout``."""
        for index, message in enumerate(self._pending):
            if message.topic == topic:
                return self._pending.pop(index)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                first, body = self.read_packet()
            except TimeoutError:
                return None
            finally:
                self.sock.settimeout(5)
            message = self._decode_publish(first, body)
            if message.topic == topic:
                return message
        return None

    def disconnect(self) -> None:
        self.sock.sendall(bytes([DISCONNECT << 4, 0]))
        self.close()


# --- Fixtures ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _close_raw_clients() -> Iterator[None]:
    yield
    while RawClient.opened:
        RawClient.opened.pop().close()


Broker = MosquittoBroker | EmbeddedBroker


@pytest.fixture(scope="module")
def embedded() -> Iterator[EmbeddedBroker]:
    pytest.importorskip("amqtt", reason="the embedded broker needs pip install 'fedmq[embedded]'")
    with EmbeddedBroker() as broker:
        yield broker


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request: pytest.FixtureRequest) -> Broker:
    started: Broker = request.getfixturevalue(request.param)
    return started


@pytest.fixture
def fed(request: pytest.FixtureRequest) -> str:
    """A federation name unique to the test: module-scoped brokers keep retained messages."""
    return f"t{abs(hash(request.node.nodeid)):x}"


def _client(
    broker: Broker,
    client_id: str,
    *,
    clean: bool = True,
    username: str | None = None,
    will: Will | None = None,
) -> RawClient:
    """A connected client (CONNACK return code 0)."""
    client = RawClient.open(broker.host, broker.port)
    assert client.connect(client_id, clean=clean, username=username, will=will)[1] == 0
    return client


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        # What any restarted server does; without it a TIME_WAIT left by the broker would count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen()
        except OSError:
            return False
    return True


# --- Both brokers --------------------------------------------------------------------------------


def test_connect_gets_connack(broker: Broker) -> None:
    client = RawClient.open(broker.host, broker.port)
    assert client.connect("fedmq-connack") == (False, 0)
    client.disconnect()


def test_mosquitto_speaks_mqtt5(mosquitto: MosquittoBroker) -> None:
    client = RawClient.open(mosquitto.host, mosquitto.port)
    assert client.connect("fedmq-v5", level=MQTT_5) == (False, 0)
    client.disconnect()


def test_embedded_refuses_mqtt5(embedded: EmbeddedBroker) -> None:
    client = RawClient.open(embedded.host, embedded.port)
    # 0x01: unacceptable protocol version -- amqtt speaks MQTT 3.1.1 only
    assert client.connect("fedmq-v5", level=MQTT_5)[1] == 0x01
    client.close()


def test_retained_qos1_reaches_a_later_subscriber(broker: Broker, fed: str) -> None:
    topic = f"fedmq/v1/{fed}/model"
    publisher = _client(broker, f"{fed}-pub")
    publisher.publish_qos1(topic, b"model-1", retain=True)

    subscriber = _client(broker, f"{fed}-sub")
    assert subscriber.subscribe(topic, qos=1) == 1
    assert subscriber.next_publish(topic) == Publish(topic, b"model-1", qos=1, retain=True)

    publisher.publish_qos1(topic, b"model-2")
    assert subscriber.next_publish(topic) == Publish(topic, b"model-2", qos=1, retain=False)
    publisher.disconnect()
    subscriber.disconnect()


def test_last_will_is_published_on_abrupt_disconnect(broker: Broker, fed: str) -> None:
    topic = f"fedmq/v1/{fed}/status/dev1"
    watcher = _client(broker, f"{fed}-watcher")
    assert watcher.subscribe(topic, qos=1) == 1
    device = _client(broker, f"{fed}-dev1", will=Will(topic, b"offline", qos=1, retain=True))

    device.close()  # no DISCONNECT: as if the device lost power

    assert watcher.next_publish(topic) == Publish(topic, b"offline", qos=1, retain=False)
    newcomer = _client(broker, f"{fed}-newcomer")
    newcomer.subscribe(topic, qos=1)
    retained = newcomer.next_publish(topic)
    # QoS not compared: amqtt may first push a QoS 0 copy (see the test below)
    assert retained is not None
    assert (retained.payload, retained.retain) == (b"offline", True)
    watcher.disconnect()
    newcomer.disconnect()


def test_embedded_pushes_retained_messages_nobody_asked_for(
    embedded: EmbeddedBroker, fed: str
) -> None:
    """amqtt 0.12.1 quirk, pinned so an upgrade that fixes it shows up here.

    On CONNECT, amqtt sends the new client every retained message matching *any* client's
    subscription, at QoS 0, before it has subscribed to anything. fedmq clients must ignore
    topics they did not subscribe to and expect the retained model twice.
    """
    topic = f"fedmq/v1/{fed}/model"
    watcher = _client(embedded, f"{fed}-watcher")
    watcher.subscribe(topic, qos=1)
    watcher.publish_qos1(topic, b"model", retain=True)

    bystander = _client(embedded, f"{fed}-bystander")  # subscribes to nothing

    assert bystander.next_publish(topic, timeout=2) == Publish(topic, b"model", qos=0, retain=True)
    watcher.disconnect()
    bystander.disconnect()


@pytest.mark.parametrize("kind", ["mosquitto", "embedded"])
def test_stop_frees_the_port(kind: str) -> None:
    if kind == "mosquitto":
        require_mosquitto()
        started: Broker = MosquittoBroker()
    else:
        pytest.importorskip("amqtt")
        started = EmbeddedBroker()
    started.start()
    connected = _client(started, "still-connected-at-stop")

    started.stop()

    assert _refused(started.host, started.port)
    assert _bindable(started.host, started.port)
    connected.close()
    if isinstance(started, MosquittoBroker):
        started.close()


@pytest.mark.parametrize("spec", ["auto", "mosquitto", "embedded"])
def test_start_broker_yields_a_working_handle(spec: str) -> None:
    if spec == "mosquitto":
        require_mosquitto()
    if spec == "embedded":
        pytest.importorskip("amqtt")
    with start_broker(spec) as handle:
        assert spec in (handle.kind, "auto")
        assert handle.mqtt5 == (handle.kind == "mosquitto")
        client = RawClient.open(handle.host, handle.port)
        assert client.connect("fedmq-handle") == (False, 0)
        client.disconnect()
    assert _refused(handle.host, handle.port)


# --- Mosquitto process control -------------------------------------------------------------------


def test_kill_then_restart_on_the_same_port(mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory()
    port, pid = broker.port, broker.pid
    assert pid is not None

    broker.kill()
    assert broker.pid is None
    assert _refused(broker.host, port)

    broker.restart()
    assert (broker.port, broker.running) == (port, True)
    assert broker.pid not in (None, pid)
    _client(broker, "after-restart").disconnect()


@pytest.mark.parametrize(
    ("how", "survives"), [("restart", True), ("kill", False)], ids=["sigterm", "sigkill"]
)
def test_persistence_keeps_retained_messages_only_across_a_clean_stop(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, how: str, survives: bool
) -> None:
    template = tmp_path / "persistent.conf"
    dev = (default_config_dir() / "dev.conf").read_text(encoding="utf-8")
    template.write_text(dev.replace("persistence false", "persistence true"), encoding="utf-8")
    broker = mosquitto_factory(template)
    topic = "fedmq/v1/persist/model"
    publisher = _client(broker, "publisher")
    publisher.publish_qos1(topic, b"model-7", retain=True)
    publisher.disconnect()

    if how == "kill":
        broker.kill()  # no save: the default autosave_interval is 30 minutes away
    broker.restart()

    subscriber = _client(broker, "subscriber")
    subscriber.subscribe(topic)
    retained = subscriber.next_publish(topic, timeout=2 if survives else SILENCE_S)
    assert (retained is not None) == survives
    subscriber.disconnect()


def test_port_in_use_is_reported(
    mosquitto: MosquittoBroker, mosquitto_factory: MosquittoFactory
) -> None:
    with pytest.raises(BrokerError, match="in use"):
        mosquitto_factory(port=mosquitto.port)


def test_start_failure_shows_the_log(tmp_path: Path, mosquitto_factory: MosquittoFactory) -> None:
    template = tmp_path / "bad.conf"
    template.write_text("listener 1883\nno_such_option 1\n", encoding="utf-8")
    with pytest.raises(BrokerError, match="no_such_option"):
        mosquitto_factory(template)


# --- Embedded broker sessions --------------------------------------------------------------------


@pytest.mark.parametrize("durable", [False, True], ids=["anonymous", "durable"])
def test_embedded_queues_for_offline_clients_only_with_durable_sessions(
    durable: bool, fed: str
) -> None:
    pytest.importorskip("amqtt")
    topic = f"fedmq/v1/{fed}/update/dev1"
    with EmbeddedBroker(durable_sessions=durable) as broker:
        aggregator = _client(broker, "aggregator", clean=False, username="aggregator")
        aggregator.subscribe(f"fedmq/v1/{fed}/update/+", qos=1)
        aggregator.disconnect()
        device = _client(broker, "dev1", username="dev1")
        device.publish_qos1(topic, b"update")
        device.disconnect()

        aggregator = RawClient.open(broker.host, broker.port)
        session_present, code = aggregator.connect("aggregator", clean=False, username="aggregator")
        assert code == 0
        queued = aggregator.next_publish(topic, timeout=3 if durable else SILENCE_S)
        aggregator.disconnect()

        anonymous = RawClient.open(broker.host, broker.port)
        anonymous_code = anonymous.connect("no-username")[1]
        anonymous.close()

    if durable:
        assert session_present
        # amqtt flags messages queued for an offline client as retained
        assert queued == Publish(topic, b"update", qos=1, retain=True)
        assert anonymous_code != 0
    else:
        assert queued is None
        assert anonymous_code == 0


# --- production.conf as written ------------------------------------------------------------------


def _run(*command: str, cwd: Path) -> None:
    subprocess.run(command, cwd=cwd, check=True, capture_output=True)


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        pytest.skip(f"{name} not found (Debian: apt-get install mosquitto openssl)")
    return path


@dataclass
class Production:
    broker: MosquittoBroker
    tls: ssl.SSLContext
    ca_file: Path


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Production]:
    """production.conf with its /etc paths moved to a temp dir, certificates and passwords made
    the way fedmq/broker_config/README.md says, and the ACL fedmq.acl renders."""
    binary = require_mosquitto()
    openssl, mosquitto_passwd = _tool("openssl"), _tool("mosquitto_passwd")
    etc = tmp_path_factory.mktemp("etc-mosquitto-fedmq")
    certs = etc / "certs"
    certs.mkdir()
    # The same commands as fedmq/broker_config/README.md, with short-lived 2048-bit keys.
    ca_subject, server_subject = "/CN=fedmq-test-ca", "/CN=localhost"
    _run(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", ca_subject, "-keyout", "ca.key", "-out", "ca.crt", cwd=certs)  # fmt: skip
    _run(openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", server_subject,
         "-keyout", "server.key", "-out", "server.csr", cwd=certs)  # fmt: skip
    (certs / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _run(openssl, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt",
         cwd=certs)  # fmt: skip
    (etc / "passwd").touch()
    for user in ("aggregator", "dev1", "dev2"):
        _run(mosquitto_passwd, "-b", "passwd", user, f"{user}-secret", cwd=etc)
    # The ACL fedmq provision writes (acl.template's shape), for the federations used below.
    (etc / "acl").write_text("\n".join(
        render_acl(fed, aggregator="aggregator", devices=["dev1", "dev2"])
        for fed in ("demo", "big", "one-aggregator")), encoding="utf-8")
    text = (default_config_dir() / "production.conf").read_text(encoding="utf-8")
    assert "/etc/mosquitto/fedmq/" in text
    (etc / "production.conf").write_text(text.replace("/etc/mosquitto/fedmq/", f"{etc}/"))

    tls = ssl.create_default_context(cafile=certs / "ca.crt")
    with MosquittoBroker(etc / "production.conf", binary=binary) as broker:
        yield Production(broker, tls, certs / "ca.crt")


def _tls_client(production: Production, client_id: str, user: str | None) -> tuple[RawClient, int]:
    client = RawClient.open(production.broker.host, production.broker.port, tls=production.tls)
    password = None if user is None else f"{user}-secret"
    return client, client.connect(client_id, username=user, password=password)[1]


def test_production_listener_is_tls_only(production: Production) -> None:
    plain = RawClient.open(production.broker.host, production.broker.port)
    plain.sock.sendall(connect_packet("plain"))
    with pytest.raises((ConnectionError, TimeoutError)):
        plain.read_packet()
    plain.close()


def test_production_refuses_anonymous_and_wrong_passwords(production: Production) -> None:
    anonymous, code = _tls_client(production, "anon", None)
    assert code == 5  # not authorised
    anonymous.close()
    wrong = RawClient.open(production.broker.host, production.broker.port, tls=production.tls)
    assert wrong.connect("dev1", username="dev1", password="guess")[1] in (4, 5)
    wrong.close()


def test_production_acl_lets_devices_write_only_their_own_topics(production: Production) -> None:
    aggregator, code = _tls_client(production, "aggregator", "aggregator")
    assert code == 0
    aggregator.subscribe("fedmq/v1/+/update/+", qos=1)
    # SUBSCRIBE is not checked against the ACL in 2.0: the SUBACK grants, nothing arrives.
    snoop, _ = _tls_client(production, "dev2", "dev2")
    assert snoop.subscribe("fedmq/v1/+/update/+", qos=1) == 1
    device, _ = _tls_client(production, "dev1", "dev1")

    device.publish_qos1("fedmq/v1/demo/update/dev2", b"impersonation")  # PUBACK, then dropped
    device.publish_qos1("fedmq/v1/demo/update/dev1", b"own")

    assert aggregator.next_publish("fedmq/v1/demo/update/dev1") == Publish(
        "fedmq/v1/demo/update/dev1", b"own", qos=1, retain=False
    )
    assert aggregator.next_publish("fedmq/v1/demo/update/dev2", timeout=SILENCE_S) is None
    assert snoop.next_publish("fedmq/v1/demo/update/dev1", timeout=SILENCE_S) is None

    aggregator.publish_qos1("fedmq/v1/demo/model", b"global", retain=True)
    assert device.subscribe("fedmq/v1/demo/model") == 1
    assert device.next_publish("fedmq/v1/demo/model") == Publish(
        "fedmq/v1/demo/model", b"global", qos=1, retain=True
    )
    for client in (aggregator, snoop, device):
        client.disconnect()


def _tls_config(production: Production, user: str) -> BrokerConfig:
    """How a fedmq service of ``user`` reaches the production broker (TLS, password)."""
    return BrokerConfig(host=production.broker.host, port=production.broker.port, username=user,
                        password=f"{user}-secret", tls=True, ca_file=str(production.ca_file),
                        reconnect_min_s=0.1, reconnect_max_s=1.0)


def test_production_carries_chunked_models_and_large_updates_over_tls(
        production: Production, monkeypatch: pytest.MonkeyPatch) -> None:
    # 68,362 parameters, 273 KB in fp32: above the 256 KiB chunk limit, so each model goes out as
    # a manifest and parts (which the ACL must let the aggregator write and devices read), and an
    # fp32 update is one 273 KB message (read in place, through TLS).
    bodies: list[int] = []

    class Counted(paho_client._Body):
        def __init__(self, size: int) -> None:
            super().__init__(size)
            bodies.append(size)

    monkeypatch.setattr(paho_client, "_Body", Counted)
    fed = "big"
    config = AggregatorConfig(
        federation=fed, broker=_tls_config(production, "aggregator"),
        model=ModelConfig(layers=[256, 256, 10], seed=0),
        rounds=RoundsConfig(min_updates=1, max_updates=1, deadline_s=60.0, max_rounds=1))
    app = ModelSubscriber(_tls_config(production, "dev2"), fed).start()
    device = PahoTransport(_tls_config(production, "dev1"), client_id="dev1")
    device.start()
    try:
        with running_aggregator(config) as agg:
            assert agg.transport.max_packet_size == 1048576  # production.conf's limit
            first = app.wait_for_version(0, timeout=20)
            assert first is not None, "the chunked model did not reach the app"
            assert agg.publisher.model_parts >= 2
            assert device.wait_connected(10)
            delta = {name: np.full(a.shape, 0.5, np.float32) for name, a in agg.model.items()}
            payload = update_payload(fed, "dev1", delta)
            assert len(payload) > 256 * 1024
            assert device.publish(f"fedmq/v1/{fed}/update/dev1", payload, qos=1) is not None
            assert agg.wait(20), f"update not folded (rejected: {dict(agg.stats.rejected)})"
            second = app.wait_for_version(1, timeout=20)
            assert second is not None
            expected = {k: v + np.float32(0.5) for k, v in weights_of(first).items()}
            got = weights_of(second)
            for name, value in expected.items():
                np.testing.assert_allclose(got[name], value, rtol=1e-6)
    finally:
        device.stop()
        app.stop()
    # Read in place, through TLS: the update (273 KB), and the first part (256 KiB) of each of
    # the two model versions (the second part, 17 KB, is below DIRECT_READ_MIN).
    assert sum(size > len(payload) - 64 for size in bodies) == 1
    assert sum(200_000 < size < 256 * 1024 for size in bodies) == 2


def test_production_second_aggregator_refuses_and_a_restart_keeps_queued_updates(
        production: Production, tmp_path: Path) -> None:
    """production.conf gives every connection of user `aggregator` the client id `aggregator`
    (use_username_as_clientid), so the check of a starting aggregator takes the running one's
    session over: the running one takes it back and the second refuses. After a stop, the check
    finds the durable session with an update queued in it and leaves it for the restart."""
    fed = "one-aggregator"

    def config(state: str) -> AggregatorConfig:
        return AggregatorConfig(
            federation=fed, broker=_tls_config(production, "aggregator"),
            model=ModelConfig(layers=[8, 3], seed=0),
            rounds=RoundsConfig(min_updates=1, max_updates=1, deadline_s=60.0, max_rounds=0),
            durability=DurabilityConfig(state_dir=str(tmp_path / state)))

    first = AggregatorService(config("a"))
    first.start()
    try:
        assert isinstance(first.transport, PahoTransport)
        second = AggregatorService(config("b"))
        with pytest.raises(AlreadyRunningError, match=(
                f"another aggregator is running for federation '{fed}' .*: it took its client "
                "id back from this one's check .* refusing to start a second one")):
            second.start()
        time.sleep(1.0)
        assert first.transport.connected  # it took its session back
        delta = {name: np.full(a.shape, 0.5, np.float32) for name, a in first.model.items()}
    finally:
        first.stop()
    # Queued for the stopped aggregator's durable session, on the broker.
    device = PahoTransport(_tls_config(production, "dev1"), client_id="dev1")
    device.start()
    try:
        assert device.wait_connected(10)
        delivery = device.publish(f"fedmq/v1/{fed}/update/dev1",
                                  update_payload(fed, "dev1", delta), qos=1)
        end = time.monotonic() + 10
        while not delivery.done() and time.monotonic() < end:
            time.sleep(0.01)
        assert delivery.done()
    finally:
        device.stop()
    with running_aggregator(config("a")) as again:  # its check finds the session and leaves it
        end = time.monotonic() + 20
        while again.stats.accepted < 1 and time.monotonic() < end:
            time.sleep(0.05)
        assert again.stats.accepted == 1, dict(again.stats.rejected)
