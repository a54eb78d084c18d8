"""The production broker config with identities from ``fedmq provision``, black-box, both paths.

For each mode (a password per identity; a client certificate per identity, its CN the
username) a fleet is provisioned, and a real Mosquitto runs the ``mosquitto.conf`` provision
wrote (TLS, the ACL, ``use_username_as_clientid``) on a free port. Every attack is watched by a
test-only observer identity appended to the ACL with ``topic read #`` over both federations:
a refused publish is one it never receives (and MQTT 5 clients also get reason code 0x87 in
the PUBACK; Mosquitto 2.0.11 does not disconnect them). Each attack has a positive control:
the same client's allowed publish does arrive.
"""

from __future__ import annotations

import ssl
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from conftest import require_mosquitto
from paho.mqtt.enums import CallbackAPIVersion

from device_agent.service import AgentService
from fedmq import codec, pki
from fedmq.broker import MosquittoBroker
from fedmq.config import BrokerConfig, load_agent, load_aggregator
from fedmq.provision import Mode, Request, provision
from fedmq.subscriber import ModelSubscriber
from fedmq.wire import RoundSummary

from fedhelpers import running_aggregator

pytestmark = pytest.mark.broker

FED, OTHER = "digits", "other"
OBSERVER = "test-observer"
NOT_AUTHORIZED = 0x87
SILENCE_S = 1.0

AGENT_TEMPLATE = """\
[data]
source = "digits"
partition = "iid"
num_shards = 2

[trainer]
kind = "mlp"

[broker]
keepalive = 20
reconnect_min_s = 0.1
reconnect_max_s = 1.0
"""
AGGREGATOR_TEMPLATE = """\
[rounds]
min_updates = 2
max_updates = 2
deadline_s = 60.0
max_rounds = 2

[broker]
reconnect_min_s = 0.1
reconnect_max_s = 1.0
"""


@dataclass
class Site:
    mode: Mode
    out: Path
    broker: MosquittoBroker
    observer: BrokerConfig

    def config(self, role_dir: str, name: str, file: str) -> BrokerConfig:
        """The [broker] table provision wrote for an identity, pointed at the test's port."""
        with (self.out / role_dir / name / file).open("rb") as fh:
            table = tomllib.load(fh)["broker"]
        table |= {"port": self.broker.port, "host": self.broker.host}
        return BrokerConfig(**table)

    def device(self, number: int) -> BrokerConfig:
        return self.config("devices", f"{FED}-{number:04d}", "agent.toml")

    def agent_toml(self, number: int, tmp: Path) -> Path:
        """A device's agent.toml as provision wrote it, with only the port changed."""
        text = (self.out / "devices" / f"{FED}-{number:04d}" / "agent.toml").read_text()
        path = tmp / f"agent-{number}.toml"
        path.write_text(text.replace("port = 8883", f"port = {self.broker.port}"))
        return path


def _observer_credentials(out: Path, mode: Mode) -> dict[str, Any]:
    """A test-only identity that may read everything: the black-box witness."""
    acl = out / "broker" / "acl"
    acl.write_text(acl.read_text() + f"\n# test only\nuser {OBSERVER}\ntopic read #\n")
    if mode == "password":
        password = pki.new_password()
        passwd = out / "broker" / "passwd"
        passwd.write_text(passwd.read_text() + pki.password_line(OBSERVER, password, None) + "\n")
        return {"username": OBSERVER, "password": password}
    ca = pki.load_ca(out / "ca" / "ca.key", out / "ca" / "ca.crt")
    pki.issue_certificate(ca, OBSERVER, 1).write(out / "observer.key", out / "observer.crt")
    return {"cert_file": str(out / "observer.crt"), "key_file": str(out / "observer.key")}


def _provision(out: Path, mode: Mode, **kw: Any) -> None:
    (out.parent / "agent-template.toml").write_text(AGENT_TEMPLATE)
    (out.parent / "aggregator-template.toml").write_text(AGGREGATOR_TEMPLATE)
    provision(Request(
        federation=FED, devices=3, out=out, mode=mode, broker_host="127.0.0.1",
        apps=["app-dashboard"], agent_template=out.parent / "agent-template.toml",
        aggregator_template=out.parent / "aggregator-template.toml",
        passwd_tool=pki.mosquitto_passwd_binary() if mode == "password" else None, **kw))


@pytest.fixture(scope="module", params=["password", "cert"])
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[Site]:
    binary = require_mosquitto()
    mode: Mode = request.param
    out = tmp_path_factory.mktemp(f"fleet-{mode}") / "fleet"
    _provision(out, mode)
    # A second federation's aggregator block, so that the observer's read of it is granted and
    # a device's write into it can be watched.
    acl = out / "broker" / "acl"
    acl.write_text(acl.read_text() + f"\nuser {OBSERVER}\ntopic read fedmq/v1/{OTHER}/#\n")
    creds = _observer_credentials(out, mode)
    with MosquittoBroker(out / "broker" / "mosquitto.conf", binary=binary) as broker:
        observer = BrokerConfig(host=broker.host, port=broker.port, tls=True,
                                ca_file=str(out / "ca" / "ca.crt"), **creds)
        yield Site(mode, out, broker, observer)


class Client:
    """A paho MQTT 5 client over TLS recording its CONNACK, PUBACK reason codes and messages."""

    def __init__(self, cfg: BrokerConfig, client_id: str) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=cfg.ca_file, certfile=cfg.cert_file, keyfile=cfg.key_file,
                            cert_reqs=ssl.CERT_REQUIRED)
        if cfg.username is not None:
            self.client.username_pw_set(cfg.username, cfg.password)
        self.connack: int | None = None
        self.pubacks: dict[int, int] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.suback = 0
        self.client.on_connect = lambda c, u, f, rc, p: setattr(self, "connack", rc.value)
        self.client.on_publish = lambda c, u, mid, rc, p: self.pubacks.__setitem__(mid, rc.value)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client.on_subscribe = lambda c, u, mid, rcs, p: setattr(self, "suback", mid)
        self.error: Exception | None = None
        try:
            self.client.connect(cfg.host, cfg.port, keepalive=20)
        except (OSError, ssl.SSLError) as exc:
            self.error = exc
            return
        self.client.loop_start()
        end = time.monotonic() + 5
        while self.connack is None and time.monotonic() < end and self.client.is_connected() \
                is not None:
            time.sleep(0.02)

    @property
    def connected(self) -> bool:
        return self.connack == 0

    def subscribe(self, topic: str) -> None:
        mid = self.client.subscribe(topic, qos=1)[1]
        end = time.monotonic() + 5
        while self.suback != mid and time.monotonic() < end:
            time.sleep(0.01)
        assert self.suback == mid

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1; the PUBACK's reason code."""
        mid = self.client.publish(topic, payload, qos=1).mid
        end = time.monotonic() + 5
        while mid not in self.pubacks and time.monotonic() < end:
            time.sleep(0.01)
        return self.pubacks[mid]

    def got(self, payload: bytes, timeout: float = SILENCE_S) -> list[str]:
        """Topics ``payload`` arrived on within ``timeout``."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(p == payload for _, p in self.messages):
                break
            time.sleep(0.02)
        return [t for t, p in self.messages if p == payload]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        # paho closes its wake-up socket pair only in __del__, which a reference cycle (these
        # callbacks) delays past the test: close it now, as fedmq.transport does.
        self.client._reset_sockets()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        c.close()


def _connect(clients: list[Client], cfg: BrokerConfig, client_id: str) -> Client:
    client = Client(cfg, client_id)
    clients.append(client)
    assert client.connected, f"{client_id}: CONNACK {client.connack}, {client.error}"
    return client


def _observer(site: Site, clients: list[Client]) -> Client:
    watcher = _connect(clients, site.observer, f"observer-{time.monotonic_ns()}")
    watcher.subscribe("fedmq/v1/#")
    return watcher


# --- authentication --------------------------------------------------------------------------


def test_anonymous_and_wrong_credentials_are_refused(site: Site, clients: list[Client]) -> None:
    ca = str(site.out / "ca" / "ca.crt")
    anonymous = Client(BrokerConfig(host=site.broker.host, port=site.broker.port, tls=True,
                                    ca_file=ca), "anonymous")
    clients.append(anonymous)
    assert not anonymous.connected
    if site.mode == "password":
        assert anonymous.connack == NOT_AUTHORIZED  # CONNACK 0x87
        device = site.device(1)
        wrong = Client(BrokerConfig(**{**device.__dict__, "password": "guess"}), "wrong")
        clients.append(wrong)
        assert wrong.connack in (0x86, NOT_AUTHORIZED)  # bad user name or password
    else:
        assert anonymous.connack is None  # no certificate: the TLS handshake fails
        stranger = pki.issue_ca("stranger-ca", 1)
        pki.issue_certificate(stranger, f"{FED}-0001", 1).write(
            site.out / "stranger.key", site.out / "stranger.crt")
        forged = Client(BrokerConfig(host=site.broker.host, port=site.broker.port, tls=True,
                                     ca_file=ca, cert_file=str(site.out / "stranger.crt"),
                                     key_file=str(site.out / "stranger.key")), "forged")
        clients.append(forged)
        assert forged.connack is None  # a device's name, signed by another CA
    _connect(clients, site.device(1), "control")  # the real credentials do connect


# --- what a device may publish ---------------------------------------------------------------


@pytest.mark.parametrize("topic", [
    f"fedmq/v1/{FED}/update/{FED}-0002",
    f"fedmq/v1/{FED}/status/{FED}-0002",
    f"fedmq/v1/{FED}/eval/{FED}-0002",
    f"fedmq/v1/{FED}/model",
    f"fedmq/v1/{FED}/model/part/0",
    f"fedmq/v1/{FED}/round",
    f"fedmq/v1/{FED}/metrics",
    f"fedmq/v1/{FED}/aggregator",
    f"fedmq/v1/{FED}/secagg/masked/{FED}-0002",
    f"fedmq/v1/{FED}/secagg/roster",
    f"fedmq/v1/{FED}/secagg/deliver/{FED}-0001",
    f"fedmq/v1/{OTHER}/update/{FED}-0001",
    f"fedmq/v1/{OTHER}/round",
])
def test_device_cannot_publish_outside_its_own_topics(site: Site, clients: list[Client],
                                                      topic: str) -> None:
    watcher = _observer(site, clients)
    device = _connect(clients, site.device(1), "attacker")
    payload = f"forged {topic} {time.monotonic_ns()}".encode()
    assert device.publish(topic, payload) == NOT_AUTHORIZED
    control = f"own update {time.monotonic_ns()}".encode()
    assert device.publish(f"fedmq/v1/{FED}/update/{FED}-0001", control) == 0
    assert watcher.got(control, timeout=5) == [f"fedmq/v1/{FED}/update/{FED}-0001"]
    assert watcher.got(payload) == []
    assert device.client.is_connected()  # 2.0.11 refuses the message, not the connection


# --- what a device may read ------------------------------------------------------------------


def test_device_cannot_read_another_devices_update(site: Site, clients: list[Client]) -> None:
    watcher = _observer(site, clients)
    snoop = _connect(clients, site.device(2), "snoop")
    for topic in (f"fedmq/v1/{FED}/update/+", f"fedmq/v1/{FED}/update/{FED}-0001",
                  "fedmq/v1/#", "#"):
        snoop.subscribe(topic)  # granted by the SUBACK: Mosquitto 2.0 checks reads on delivery
    device = _connect(clients, site.device(1), "victim")
    payload = f"private update {time.monotonic_ns()}".encode()
    assert device.publish(f"fedmq/v1/{FED}/update/{FED}-0001", payload) == 0
    assert watcher.got(payload, timeout=5) == [f"fedmq/v1/{FED}/update/{FED}-0001"]
    assert snoop.got(payload) == []


def test_device_cannot_read_another_devices_share_delivery(site: Site,
                                                          clients: list[Client]) -> None:
    """Secure aggregation: the sealed shares the aggregator relays to device 2 reach device 2
    only (device 1 subscribed too)."""
    aggregator = _connect(clients, site.config("aggregator", f"{FED}-aggregator",
                                               "aggregator.toml"), f"{FED}-aggregator")
    owner = _connect(clients, site.device(2), "owner")
    snoop = _connect(clients, site.device(1), "snoop")
    owner.subscribe(f"fedmq/v1/{FED}/secagg/deliver/{FED}-0002")
    snoop.subscribe(f"fedmq/v1/{FED}/secagg/deliver/+")
    payload = f"sealed shares {time.monotonic_ns()}".encode()
    assert aggregator.publish(f"fedmq/v1/{FED}/secagg/deliver/{FED}-0002", payload) == 0
    assert owner.got(payload, timeout=5) == [f"fedmq/v1/{FED}/secagg/deliver/{FED}-0002"]
    assert snoop.got(payload) == []


def test_participant_list_is_for_operators_only(site: Site, clients: list[Client]) -> None:
    """A round summary (every accepted device and update id) reaches the operator, not a device
    and not an app; an app still gets the counts-only topics, a device the model."""
    aggregator = _connect(clients, site.config("aggregator", f"{FED}-aggregator",
                                               "aggregator.toml"), f"{FED}-aggregator")
    operator = _connect(clients, site.config("operators", f"{FED}-operator", "broker.toml"),
                        "operator")
    app = _connect(clients, site.config("apps", "app-dashboard", "broker.toml"), "app")
    device = _connect(clients, site.device(2), "reader")
    for reader in (operator, app, device):
        reader.subscribe(f"fedmq/v1/{FED}/#")
    summary = codec.encode(RoundSummary(FED, round=7, version=7, participants=2,
                                        closed_by="max_updates",
                                        accepted=((f"{FED}-0001", "u1"), (f"{FED}-0003", "u2"))))
    counts, model = f"progress {time.monotonic_ns()}".encode(), b"model bytes"
    status = f"status {time.monotonic_ns()}".encode()
    assert aggregator.publish(f"fedmq/v1/{FED}/metrics", summary) == 0
    assert aggregator.publish(f"fedmq/v1/{FED}/metrics/progress", counts) == 0
    assert aggregator.publish(f"fedmq/v1/{FED}/model", model) == 0
    assert _connect(clients, site.device(3), "status").publish(
        f"fedmq/v1/{FED}/status/{FED}-0003", status) == 0

    assert operator.got(summary, timeout=5) == [f"fedmq/v1/{FED}/metrics"]
    assert operator.got(status, timeout=5) == [f"fedmq/v1/{FED}/status/{FED}-0003"]
    assert app.got(counts, timeout=5) == [f"fedmq/v1/{FED}/metrics/progress"]
    assert device.got(model, timeout=5) == [f"fedmq/v1/{FED}/model"]
    assert device.got(summary) == []
    assert app.got(summary) == []
    assert device.got(status) == []
    assert app.got(status) == []
    assert device.got(counts) == []  # a device needs only the round and the model
    assert operator.publish(f"fedmq/v1/{FED}/model", b"operator write") == NOT_AUTHORIZED
    assert app.publish(f"fedmq/v1/{FED}/update/app-dashboard", b"app write") == NOT_AUTHORIZED


# --- the federation works over it --------------------------------------------------------------


def test_two_agents_two_rounds_with_provisioned_identities(site: Site, tmp_path: Path) -> None:
    agg_toml = site.out / "aggregator" / f"{FED}-aggregator" / "aggregator.toml"
    local = tmp_path / "aggregator.toml"
    local.write_text(agg_toml.read_text().replace("port = 8883", f"port = {site.broker.port}"))
    config = load_aggregator(local)
    agents = [AgentService.from_config(load_agent(site.agent_toml(n, tmp_path)))
              for n in (1, 2)]
    operator = ModelSubscriber(site.config("operators", f"{FED}-operator", "broker.toml"), FED,
                               summaries=True).start()
    try:
        for agent in agents:
            agent.start()
        with running_aggregator(config) as agg:
            assert agg.wait(120), f"two rounds did not close: {dict(agg.stats.rejected)}"
            assert agg.stats.rounds_completed == 2
            assert agg.stats.accepted == 4
            assert not agg.stats.rejected
        latest = operator.wait_for_version(2, timeout=20)
        assert latest is not None
        assert latest.version == 2
        end = time.monotonic() + 10
        while len(operator.summaries) < 2 and time.monotonic() < end:
            time.sleep(0.05)
        ids = sorted(d for s in operator.summaries.values() for d, _ in s.accepted)
        assert ids == [f"{FED}-0001", f"{FED}-0001", f"{FED}-0002", f"{FED}-0002"]
    finally:
        for agent in agents:
            agent.stop()
        operator.stop()


# --- rotation and revocation -----------------------------------------------------------------


def test_rotate_and_revoke_one_device(tmp_path: Path) -> None:
    """Per mode: rotating a device's credentials locks its old ones out and the new ones in;
    revoking one locks it out; the others keep working. Both after a SIGHUP only."""
    binary = require_mosquitto()
    for mode in ("password", "cert"):
        out = tmp_path / mode / "fleet"
        out.parent.mkdir()
        _provision(out, mode)
        with MosquittoBroker(out / "broker" / "mosquitto.conf", binary=binary) as broker:
            site = Site(mode, out, broker, BrokerConfig())
            old2, old3 = site.device(2), site.device(3)
            if mode == "cert":  # provision replaces the files: keep copies of the old ones
                for n, cfg in ((2, old2), (3, old3)):
                    for src in (cfg.cert_file, cfg.key_file):
                        assert src is not None
                        (tmp_path / f"{mode}-{n}-{Path(src).name}").write_bytes(
                            Path(src).read_bytes())
                old2 = BrokerConfig(**{**old2.__dict__,
                                       "cert_file": str(tmp_path / f"{mode}-2-client.crt"),
                                       "key_file": str(tmp_path / f"{mode}-2-client.key")})
                old3 = BrokerConfig(**{**old3.__dict__,
                                       "cert_file": str(tmp_path / f"{mode}-3-client.crt"),
                                       "key_file": str(tmp_path / f"{mode}-3-client.key")})
            # --revoke deletes the device's folder, ca.crt included
            ca = str(out / "ca" / "ca.crt")
            old2, old3 = (BrokerConfig(**{**c.__dict__, "ca_file": ca}) for c in (old2, old3))
            for cfg in (old2, old3):
                c = Client(cfg, "before")
                assert c.connected, mode
                c.close()
            _provision(out, mode, rotate=[f"{FED}-0002"],
                       revoke=[f"{FED}-0003"])
            broker.reload()
            time.sleep(0.5)
            for cfg, what in ((old2, "rotated away"), (old3, "revoked")):
                c = Client(cfg, what)
                assert not c.connected, f"{mode}: {what} credentials still accepted"
                c.close()
            assert not (out / "devices" / f"{FED}-0003").exists()
            for n in (1, 2):
                c = Client(site.device(n), f"after-{n}")
                assert c.connected, f"{mode}: device {n} locked out"
                c.close()


def test_password_hashes_made_without_mosquitto_passwd_work(tmp_path: Path) -> None:
    """The fallback hasher's lines (``$7$`` sha512-pbkdf2) are accepted by the real broker."""
    binary = require_mosquitto()
    out = tmp_path / "fleet"
    provision(Request(federation=FED, devices=1, out=out, broker_host="127.0.0.1",
                      passwd_tool=None))
    assert all(line.split(":", 1)[1].startswith("$7$101$")
               for line in (out / "broker" / "passwd").read_text().splitlines())
    with MosquittoBroker(out / "broker" / "mosquitto.conf", binary=binary) as broker:
        site = Site("password", out, broker, BrokerConfig())
        c = Client(site.device(1), "fallback")
        assert c.connected
        c.close()
        wrong = Client(BrokerConfig(**{**site.device(1).__dict__, "password": "x"}), "bad")
        assert not wrong.connected
        wrong.close()
