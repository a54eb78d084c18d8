"""Signed models and secure aggregation over the production broker config (issue 12, acceptance 1
and point 3), with every identity from ``fedmq provision``.

A fleet is provisioned whose aggregator signs with a key from ``fedmq keys generate`` and whose
devices pin its public key (both through provision's templates); a real Mosquitto runs the
``mosquitto.conf`` provision wrote (TLS, passwords or client certificates, the ACL,
``use_username_as_clientid``). Two things are checked end to end:

- an attacker holding the aggregator's leaked broker credential (the only identity the ACL lets
  write the model and round topics) publishes forgeries, retained, while a round is open: every
  agent refuses each with the expected counted reason, keeps its model, and the federation goes
  on; a device's own credential cannot publish there at all;
- a secure-aggregation round with three provisioned devices closes with every device accepted,
  nothing rejected, and the model the plain mean of their updates gives.

The rounds of the attack test are paced as in test_signed_models.py: ``min_updates`` is one
more than the training agents and the test sends the last update as device 0004 (an honest
provisioned device). Run with ``-s`` to see the attack table.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import require_mosquitto
from test_production_identity import (
    AGENT_TEMPLATE,
    FED,
    NOT_AUTHORIZED,
    SILENCE_S,
    Client,
    Site,
    _observer_credentials,
)
from test_signed_models import LATER, _one_byte, _print_table, _takeover

from aggregator.service import AggregatorService
from device_agent.pacing import STATUS_REFRESH_S
from device_agent.service import AgentService
from fedmq import codec, keys, pki, signing
from fedmq.broker import MosquittoBroker
from fedmq.compression import encode_all
from fedmq.config import (
    AggregatorConfig,
    BrokerConfig,
    PrivacyConfig,
    RoundsConfig,
    load_agent,
    load_aggregator,
)
from fedmq.provision import Mode, Request, provision
from fedmq.topics import Topics
from fedmq.wire import DeviceStatus, GlobalModel, RoundAnnouncement, model_digest

from fedhelpers import Recorder, running_aggregator, update_payload, wait_until, weights_of

pytestmark = pytest.mark.broker

DEVICES = 4  # 0001-0003 run agents; 0004 is the test's own honest device (the pacer)
PACER = f"{FED}-0004"
TOPICS = Topics(FED)


@dataclasses.dataclass
class TrustSite(Site):
    public: str = ""  # the federation's key, as devices pin it


@pytest.fixture(scope="module", params=["password", "cert"])
def trust_site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[TrustSite]:
    binary = require_mosquitto()
    mode: Mode = request.param
    root = tmp_path_factory.mktemp(f"trust-{mode}")
    private, public = keys.generate(root / "keys")
    agent_template = root / "agent-template.toml"
    agent_template.write_text(AGENT_TEMPLATE.replace("num_shards = 2", "num_shards = 3")
                              + f'\n[security]\ntrusted_keys = ["{public}"]\n')
    aggregator_template = root / "aggregator-template.toml"
    aggregator_template.write_text(f'[security]\nsigning_key = "{private}"\n\n'
                                   "[broker]\nreconnect_min_s = 0.1\nreconnect_max_s = 1.0\n")
    out = root / "fleet"
    provision(Request(
        federation=FED, devices=DEVICES, out=out, mode=mode, broker_host="127.0.0.1",
        agent_template=agent_template, aggregator_template=aggregator_template,
        passwd_tool=pki.mosquitto_passwd_binary() if mode == "password" else None))
    creds = _observer_credentials(out, mode)
    with MosquittoBroker(out / "broker" / "mosquitto.conf", binary=binary) as broker:
        observer = BrokerConfig(host=broker.host, port=broker.port, tls=True,
                                ca_file=str(out / "ca" / "ca.crt"), **creds)
        yield TrustSite(mode, out, broker, observer, public)


def _local(site: Site, path: Path, tmp: Path) -> Path:
    """A provisioned config file with only the port changed."""
    local = tmp / f"{path.parent.name}-{path.name}"
    local.write_text(path.read_text().replace("port = 8883", f"port = {site.broker.port}"))
    return local


def _agents(site: TrustSite, tmp: Path, n: int) -> list[AgentService]:
    agents = []
    for i in range(1, n + 1):
        config = load_agent(_local(site, site.out / "devices" / f"{FED}-{i:04d}" / "agent.toml",
                                   tmp))
        assert list(config.security.trusted_keys) == [site.public]
        agents.append(AgentService.from_config(config))
    return agents


def _aggregator_config(site: Site, tmp: Path, rounds: RoundsConfig,
                       privacy: PrivacyConfig | None = None) -> AggregatorConfig:
    path = site.out / "aggregator" / f"{FED}-aggregator" / "aggregator.toml"
    config = load_aggregator(_local(site, path, tmp))
    assert config.security.signing_key
    return dataclasses.replace(config, rounds=rounds, privacy=privacy or config.privacy)


def _status(site: Site, device: str) -> DeviceStatus:
    """``device``'s retained status as the test's read-everything observer sees it."""
    reader = Client(site.observer, f"status-{time.monotonic_ns()}")
    try:
        assert reader.connected
        reader.subscribe(TOPICS.status(device))
        wait_until(lambda: any(t == TOPICS.status(device) for t, _ in reader.messages), 10,
                   f"{device}'s retained status")
        payload = [p for t, p in reader.messages if t == TOPICS.status(device)][-1]
    finally:
        reader.close()
    return codec.decode_as(payload, DeviceStatus)


def _forged(real: GlobalModel) -> GlobalModel:
    """The issue's takeover model: the real model's shapes, all zeros, a far later run."""
    zeros = {k: np.zeros_like(v) for k, v in weights_of(real).items()}
    tensors = encode_all(zeros)
    return GlobalModel(federation=FED, version=0, round=0, tensors=tensors,
                       sha256=model_digest(tensors), run=LATER)


class Paced:
    """The aggregator's rounds, closed by the test's own device (the pacer's credential)."""

    def __init__(self, site: Site, agg: AggregatorService, agents: list[AgentService],
                 rec: Recorder) -> None:
        self.agg, self.agents, self.rec = agg, agents, rec
        self.pacer = Client(site.device(int(PACER[-4:])), "pacer")
        assert self.pacer.connected
        self.goal = 0
        self.rng = np.random.default_rng(0)

    def open_round(self, round_: int) -> None:
        self.goal += len(self.agents)
        agg = self.agg
        wait_until(lambda: agg.round == round_ and agg.stats.accepted >= self.goal, 90,
                   f"round {round_} open with every agent's update folded")

    def close_round(self) -> None:
        agg = self.agg
        round_, version = agg.round, agg.version
        delta = {k: (self.rng.standard_normal(v.shape) * 1e-3).astype(np.float32)
                 for k, v in agg.model.items()}
        assert self.pacer.publish(TOPICS.update(PACER), update_payload(
            FED, PACER, delta, round_=round_, base_version=version, run=agg.run)) == 0
        self.goal += 1
        wait_until(lambda: agg.version == version + 1, 30, f"round {round_} closed")
        wait_until(lambda: all(a.machine.model_version == version + 1 for a in self.agents),
                   30, f"every agent holds version {version + 1}")

    def real_model(self, version: int) -> bytes:
        self.rec.drain()
        found = [bytes(msg.payload) for msg, m in self.rec.messages
                 if isinstance(m, GlobalModel) and m.version == version and m.chunk is None
                 and m.run == self.agg.run and m.sig is not None]
        assert found, f"no recorded signed model version {version}"
        return found[-1]

    def real_round(self, round_: int) -> bytes:
        self.rec.drain()
        found = [bytes(msg.payload) for msg, m in self.rec.messages
                 if isinstance(m, RoundAnnouncement) and m.round == round_ and m.open
                 and m.run == self.agg.run and m.sig is not None]
        assert found, f"no recorded signed announcement of round {round_}"
        return found[-1]


Row = tuple[str, str, str]


def _settled(agents: list[AgentService], agg: AggregatorService) -> dict[str, Counter[str]]:
    """The agents' refusal counts once the aggregator is back and its republish has landed."""
    assert agg.transport.wait_connected(30), "the aggregator did not reconnect"
    last: dict[str, Counter[str]] = {}
    end = time.monotonic() + 30
    while time.monotonic() < end:  # unchanged over 1.5 s (more than the 1 s reconnect cap)
        now = {a.device_id: Counter(a.ignored) for a in agents}
        if now == last:
            return now
        last = now
        time.sleep(1.5)
    raise AssertionError("the agents' counts did not settle")


def _with_leaked_credential(creds: BrokerConfig, topic: str | None, payload: bytes) -> None:
    """Connect as the aggregator (the broker forces its client id: the aggregator is kicked
    off), publish ``payload`` retained if ``topic``, disconnect."""
    attacker = Client(creds, "attacker")
    try:
        assert attacker.connected
        if topic is not None:
            mid = attacker.client.publish(topic, payload, qos=1, retain=True).mid
            wait_until(lambda: mid in attacker.pubacks, 10, "the PUBACK")
            assert attacker.pubacks[mid] == 0  # the leaked credential may write there
    finally:
        attacker.close()


def _device_cannot_publish(paced: Paced, forged: GlobalModel, r2: bytes) -> Row:
    """A device's own credential: the broker refuses the write, no agent sees it."""
    before = {a.device_id: Counter(a.ignored) for a in paced.agents}
    payloads = [(TOPICS.model, codec.encode(forged)),
                (TOPICS.round, codec.encode(_takeover(r2, forged)))]
    for topic, payload in payloads:
        assert paced.pacer.publish(topic, payload) == NOT_AUTHORIZED
    time.sleep(SILENCE_S)
    paced.rec.drain()
    assert not [m for m, _ in paced.rec.messages if m.payload in {p for _, p in payloads}]
    assert all(a.ignored == before[a.device_id] for a in paced.agents)
    return ("device 0004's own credential publishes the forged model and announcement",
            "PUBACK 0x87, never delivered",
            "PUBACK 0x87 twice; the operator's recorder got neither; no agent counted anything")


def _attacks(paced: Paced, creds: BrokerConfig) -> list[Row]:
    """Round 2 is open, every agent holds version 1: each forgery with the leaked aggregator
    credential, retained. Each use kicks the aggregator off (one client id per username), which
    on reconnecting republishes its retained model and round; each agent counts every copy of
    version 1 as ``old_model``, so the copies the operator's recorder saw are added to what
    each attack must cost. Measured first with a connection that publishes nothing."""
    agents, agg = paced.agents, paced.agg
    run = agg.run
    v0, v1 = paced.real_model(0), paced.real_model(1)
    r1, r2 = paced.real_round(1), paced.real_round(2)
    held = {a.device_id: (a.machine.model_version, a.machine.model_sha256, a.machine.weights)
            for a in agents}
    sent = {a.device_id: a.updates_sent for a in agents}
    forged = _forged(codec.decode_as(v1, GlobalModel))
    other = signing.Signer(signing.generate())
    rows = [_device_cannot_publish(paced, forged, r2)]

    def republished() -> int:  # the aggregator's copies of version 1 (byte for byte)
        paced.rec.drain()
        return sum(bytes(m.payload) == v1 for m, _ in paced.rec.messages)

    before, copies = _settled(agents, agg), republished()
    _with_leaked_credential(creds, None, b"")
    after, again = _settled(agents, agg), republished() - copies
    assert again >= 1
    for a in agents:
        assert after[a.device_id] - before[a.device_id] == Counter({"old_model": again})
    rows.append(("connect with the leaked aggregator credential, publish nothing (control)",
                 "the aggregator is kicked off, reconnects, republishes version 1",
                 f"version 1 republished {again}x; old_model +{again} on each agent "
                 "(a version it holds: routine, not logged)"))
    attacks = [
        ("unsigned all-zero model with a later run", TOPICS.model, codec.encode(forged),
         "unsigned"),
        ("model signed by another key, later run", TOPICS.model,
         codec.encode(other.model(forged, signing.manifest_of(forged))), "untrusted_key"),
        ("replay of the signed model version 0", TOPICS.model, v0, "old_model"),
        ("replay of the signed announcement of round 1", TOPICS.round, r1, "old_round"),
        ("signed model version 1, one byte changed (version 1 -> 3)", TOPICS.model,
         _one_byte(v1, b"\xa7version\x01", b"\xa7version\x03"), "altered"),
        ("unsigned announcement with a later run", TOPICS.round,
         codec.encode(_takeover(r2, forged)), "unsigned"),
    ]
    for attempted, topic, payload, reason in attacks:
        before, copies = _settled(agents, agg), republished()
        _with_leaked_credential(creds, topic, payload)
        after, again = _settled(agents, agg), republished() - copies
        assert again >= 1, attempted  # the forgery did not stay the retained model
        for a in agents:
            got = after[a.device_id] - before[a.device_id]
            assert got == Counter({reason: 1}) + Counter({"old_model": again}), (attempted, got)
            m = a.machine
            assert (m.run, m.model_version, m.model_sha256) == (run, *held[a.device_id][:2])
            assert m.weights is held[a.device_id][2], attempted
            assert a.updates_sent == sent[a.device_id], attempted
        rows.append((f"{attempted} (retained, leaked aggregator credential)", reason,
                     f"{reason} +1 on both agents (and old_model +{again}: version 1 "
                     f"republished {again}x after the kick); version 1 kept"))
    return rows


def test_leaked_aggregator_credential_cannot_take_over_signed_agents(
        trust_site: TrustSite, tmp_path: Path) -> None:
    site = trust_site
    config = _aggregator_config(site, tmp_path, RoundsConfig(
        min_updates=3, max_updates=3, deadline_s=300.0, grace_s=0.5, max_rounds=0))
    agents = _agents(site, tmp_path, 2)
    rec = Recorder(site.config("operators", f"{FED}-operator", "broker.toml"), FED).start()
    paced: Paced | None = None
    try:
        for a in agents:
            a.start()
            assert a.gate is not None  # the agent verifies: its config pins the key
        with running_aggregator(config) as agg:
            paced = Paced(site, agg, agents, rec)
            paced.open_round(1)
            paced.close_round()
            paced.open_round(2)  # every agent holds version 1 and sent its update for round 2
            rows = _attacks(paced, site.config("aggregator", f"{FED}-aggregator",
                                               "aggregator.toml"))
            reasons = ("unsigned", "untrusted_key", "old_model", "old_round", "altered")
            for a in agents:  # the counts reach the agent's retained status
                mine = {r: a.ignored[r] for r in reasons}
                assert mine["unsigned"] == 2
                assert mine["untrusted_key"] == mine["altered"] == mine["old_round"] == 1
                wait_until(lambda a=a, mine=mine, rs=reasons: {  # type: ignore[misc]
                    r: _status(site, a.device_id).ignored.get(r, 0) for r in rs} == mine,
                    5 + 2 * STATUS_REFRESH_S, f"{a.device_id}'s retained status")
            # The federation closes round 2 and completes round 3 with the real signed models.
            paced.close_round()
            paced.open_round(3)
            paced.close_round()
            assert all(a.machine.run == agg.run and a.machine.model_version == 3
                       for a in agents)
            assert agg.stats.rounds_completed == 3
            assert sum(agg.stats.rejected.values()) == 0, agg.stats.rejected
            rec.wait_for(lambda r: any(s.round == 3 for s in r.summaries()))
            accepted = {s.round: {d for d, _ in s.accepted} for s in rec.summaries()}
            for round_ in (2, 3):  # the rounds closed after the attacks took every agent
                assert accepted[round_] == {PACER, f"{FED}-0001", f"{FED}-0002"}, accepted
    finally:
        if paced is not None:
            paced.pacer.close()
        for a in agents:
            a.stop()
        rec.stop()
    _print_table(f"attacks over the production config ({site.mode})", rows)


def test_secure_aggregation_round_with_provisioned_identities(trust_site: TrustSite,
                                                              tmp_path: Path) -> None:
    config = _aggregator_config(site := trust_site, tmp_path, RoundsConfig(
        min_updates=3, max_updates=3, deadline_s=90.0, grace_s=0.5, max_rounds=1),
        PrivacyConfig(secure_aggregation=True))
    agents = _agents(site, tmp_path, 3)
    rec = Recorder(site.config("operators", f"{FED}-operator", "broker.toml"), FED).start()
    try:
        for a in agents:
            a.start()
        with running_aggregator(config) as agg:
            assert agg.wait(120), f"the secure round did not close: {dict(agg.stats.rejected)}"
            assert agg.stats.rounds_completed == 1
            assert not agg.stats.rejected, agg.stats.rejected
            rec.wait_for(lambda r: 1 in r.models())
        wait_until(lambda: all(a.machine.model_version == 1 for a in agents), 30,
                   "every agent holds the secure round's signed model")
    finally:
        for a in agents:
            a.stop()
        rec.stop()
    summary = rec.summaries()[-1]
    assert {d for d, _ in summary.accepted} == {f"{FED}-000{i}" for i in (1, 2, 3)}
    model = rec.models()[1]
    assert model.sig is not None
    assert model.metrics.get("participants") == 3
