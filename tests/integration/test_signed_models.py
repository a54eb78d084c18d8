"""Signed models and announcements over a real Mosquitto (issue 12, point 1; docs/security.md).

A real aggregator signs with a key from ``fedmq keys generate``; real agents, built from agent
configs, pin its public key. An attacker client with write access to the model and round topics
publishes, retained, what the issue's attacks need: unsigned and foreign-key models and
announcements with a later run (the takeover seen in the issue), replays of older signed ones,
signed ones with one byte changed, a chunk swapped in from another version. Every agent must
refuse each, count it under the expected reason (also in its retained status), keep the model
it had, and the federation must go on completing rounds with the real aggregator.

The rounds are paced by the test: ``min_updates`` is one more than the training agents, and the
test sends that last update itself (an honest device), so each attack lands while a round is
open and the aggregator publishes nothing else. The model is chunked (9.6 kB in 5 parts).

Run with ``-s`` to see the attack table.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from aggregator.service import AggregatorService
from device_agent.pacing import STATUS_REFRESH_S
from device_agent.service import AgentService
from device_agent.trainers import MLPTrainer
from fedmq import codec, keys, signing
from fedmq.broker import MosquittoBroker
from fedmq.compression import encode_all
from fedmq.config import (
    AgentConfig,
    BrokerConfig,
    CompressionConfig,
    DataConfig,
    DeviceConfig,
    ModelConfig,
    SigningConfig,
    TrainSettings,
    TrustConfig,
)
from fedmq.topics import Topics
from fedmq.transport import Delivery, Message, PahoTransport
from fedmq.wire import DeviceStatus, GlobalModel, RoundAnnouncement, model_digest

from fedhelpers import (
    Recorder,
    aggregator_config,
    broker_config,
    running_aggregator,
    unique_federation,
    update_payload,
    wait_until,
)

pytestmark = pytest.mark.broker

AGENTS = 3
LAYERS = [64, 32, 10]  # 2410 parameters, 9.6 kB: chunked below 4 kB
CHUNK = 4096
LATER = 10**15  # a run id far after the real one (the takeover)


def _wait(pred: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    wait_until(pred, timeout, what)


def _acked(delivery: Delivery) -> None:
    _wait(delivery.done, "the broker's PUBACK", 10)


def _flip(payload: bytes, at: int) -> bytes:
    return payload[:at] + bytes([payload[at] ^ 0x01]) + payload[at + 1:]


class Federation:
    """A signed federation with paced rounds, agents from agent configs, and an attacker."""

    def __init__(self, broker: BrokerConfig, tmp: Path) -> None:
        self.broker, self.tmp = broker, tmp
        self.fed = unique_federation("signed")
        self.topics = Topics(self.fed)
        private, self.public = keys.generate(tmp / "keys")
        self.key_id = signing.key_id(signing.parse_public(self.public))
        config = aggregator_config(broker, self.fed, min_updates=AGENTS + 1,
                                   max_updates=AGENTS + 1, deadline_s=300.0, max_rounds=0)
        self.config = dataclasses.replace(
            config, model=ModelConfig(layers=LAYERS, seed=1),
            security=SigningConfig(signing_key=str(private)),
            compression=CompressionConfig(max_chunk_bytes=CHUNK),
            train=TrainSettings(epochs=1, batch_size=8, lr=0.05))
        self.rec = Recorder(broker, self.fed)
        self.attacker = PahoTransport(broker, client_id=f"attacker-{self.fed}")
        self.agents: dict[str, AgentService] = {}
        self.agg: AggregatorService | None = None
        self.rng = np.random.default_rng(0)
        self.goal = 0  # updates folded so far, as the test expects them

    # ---------------------------------------------------------------- devices

    def agent(self, name: str, *, train: bool = True, state: str | None = None) -> AgentService:
        """A started agent built from an agent config that trusts the federation's key;
        ``train=False``: an evaluation-only device (it follows models, sends no updates)."""
        rng = np.random.default_rng(sum(map(ord, name)))
        x = rng.standard_normal((24, LAYERS[0])).astype(np.float32)
        y = rng.integers(0, LAYERS[-1], 24)
        config = AgentConfig(
            federation=self.fed, broker=self.broker,
            device=DeviceConfig(id=name, state_dir=str(self.tmp / (state or name))),
            data=DataConfig(eval_fraction=0.0 if train else 1.0),
            security=TrustConfig(trusted_keys=[self.public]))
        service = AgentService.from_config(config, MLPTrainer(x, y, LAYERS[-1]))
        assert service.gate is not None
        service.start()
        self.agents[name] = service
        return service

    def stop_agent(self, name: str) -> None:
        self.agents.pop(name).stop()

    # ---------------------------------------------------------------- rounds

    @property
    def aggregator(self) -> AggregatorService:
        assert self.agg is not None
        return self.agg

    def open_round(self, round_: int, trainers: int = AGENTS) -> None:
        """Wait until round ``round_`` is open and ``trainers`` agents' updates for it are
        folded: the aggregator now waits for the test's update (``close_round``)."""
        agg = self.aggregator
        self.goal += trainers
        _wait(lambda: agg.round == round_ and agg.stats.accepted >= self.goal,
              f"round {round_} open with {trainers} agents' updates folded")

    def close_round(self) -> None:
        """Send the test's honest update for the open round: the round closes, and every
        agent takes the new model."""
        agg = self.aggregator
        round_, version = agg.round, agg.version
        delta = {k: (self.rng.standard_normal(v.shape) * 1e-3).astype(np.float32)
                 for k, v in agg.model.items()}
        _acked(self.rec.transport.publish(self.topics.update("pacer"), update_payload(
            self.fed, "pacer", delta, round_=round_, base_version=version, run=agg.run), qos=1))
        self.goal += 1
        _wait(lambda: agg.version == version + 1, f"round {round_} closed")
        self.wait_model(version + 1)

    def wait_model(self, version: int) -> None:
        """Every agent holds the real model ``version``."""
        _wait(lambda: all(a.machine.model_version == version for a in self.agents.values()),
              f"every agent holds version {version}")

    # ---------------------------------------------------------------- recorded real messages

    def real(self, version: int) -> tuple[bytes, list[bytes]]:
        """The aggregator's messages of model ``version``: its signed manifest, its parts."""
        self.rec.drain()
        head, parts = b"", {}
        for msg, m in self.rec.messages:
            if isinstance(m, GlobalModel) and m.version == version and m.run == self.aggregator.run:
                if m.chunk is None and m.sig is not None and m.sig.key == self.key_id:
                    head = bytes(msg.payload)
                elif m.chunk is not None:
                    parts[m.chunk] = bytes(msg.payload)
        assert head
        assert len(parts) == codec.decode_as(head, GlobalModel).chunks
        return head, [parts[i] for i in sorted(parts)]

    def real_round(self, round_: int) -> bytes:
        """The aggregator's signed announcement opening ``round_``."""
        self.rec.drain()
        for msg, m in self.rec.messages:
            if (isinstance(m, RoundAnnouncement) and m.round == round_ and m.open
                    and m.run == self.aggregator.run and m.sig is not None):
                return bytes(msg.payload)
        raise AssertionError(f"no recorded announcement of round {round_}")

    # ---------------------------------------------------------------- the attacker

    def publish(self, topic: str, payload: bytes) -> None:
        _acked(self.attacker.publish(topic, payload, qos=1, retain=True))

    def status(self, device: str) -> DeviceStatus:
        """``device``'s retained status, as any operator's client reads it."""
        reader = PahoTransport(self.broker, client_id=f"status-{device}-{time.monotonic_ns()}")
        reader.subscribe(self.topics.status(device), qos=1)
        reader.start()
        try:
            msg: Message = reader.inbox.get(timeout=10)
        finally:
            reader.stop()
        return codec.decode_as(msg.payload, DeviceStatus)


@contextmanager
def signed_federation(mosquitto: MosquittoBroker, tmp: Path) -> Iterator[Federation]:
    f = Federation(broker_config(mosquitto), tmp)
    f.rec.start()
    f.attacker.start()
    assert f.attacker.wait_connected(10)
    try:
        yield f
    finally:
        for a in list(f.agents.values()):
            a.stop()
        f.attacker.stop()
        f.rec.stop()


def _forged_model(fed: str) -> GlobalModel:
    """The issue's forged model: all zeros, version 0 of a run far after the real one."""
    weights: dict[str, np.ndarray] = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(LAYERS)):
        weights[f"w{i}"] = np.zeros((n_in, n_out), np.float32)
        weights[f"b{i}"] = np.zeros(n_out, np.float32)
    tensors = encode_all(weights)
    return GlobalModel(federation=fed, version=0, round=0, tensors=tensors,
                       sha256=model_digest(tensors), run=LATER)


def _print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    print(f"\n{title}\n| attempted | expected | observed |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def _observed(agents: list[AgentService], before: dict[str, Counter[str]]) -> str:
    """What each agent counted since ``before``, said once if all agree."""
    seen = {", ".join(f"{r} +{n}" for r, n in sorted((a.ignored - before[a.device_id]).items()))
            for a in agents}
    return " / ".join(sorted(seen))


def _one_byte(payload: bytes, old: bytes, new: bytes) -> bytes:
    """``payload`` with the first ``old`` (a msgpack key and its value) given ``new``'s last
    byte: one byte changed."""
    at = payload.index(old) + len(old) - 1
    assert len(old) == len(new)
    assert old[:-1] == new[:-1]
    return payload[:at] + new[-1:] + payload[at + 1:]


Row = tuple[str, str, str]


def _live_attacks(f: Federation, running: list[AgentService]) -> list[Row]:
    """Round 2 is open and every agent holds version 1: each attack in turn, retained."""
    run = f.aggregator.run
    v0_head, v0_parts = f.real(0)
    v1_head, _ = f.real(1)
    r1, r2 = f.real_round(1), f.real_round(2)
    held = {a.device_id: (a.machine.run, a.machine.model_version, a.machine.model_sha256,
                          a.machine.weights) for a in running}
    assert {h[:2] for h in held.values()} == {(run, 1)}
    sent = {a.device_id: a.updates_sent for a in running}
    other = signing.Signer(signing.generate())
    forged = _forged_model(f.fed)
    t = f.topics
    live = [
        ("unsigned all-zero model with a later run (the issue's takeover)", t.model,
         codec.encode(forged), "unsigned"),
        ("unsigned announcement with a later run (the issue's takeover)", t.round,
         codec.encode(_takeover(r2, forged)), "unsigned"),
        ("model signed by another key, later run", t.model,
         codec.encode(other.model(forged, signing.manifest_of(forged))), "untrusted_key"),
        ("announcement signed by another key, later run", t.round,
         codec.encode(other.round(_takeover(r2, forged))), "untrusted_key"),
        ("replay of the signed model version 0 (its manifest)", t.model, v0_head, "old_model"),
        ("replay of a part of the signed model version 0", t.model_part(1), v0_parts[1],
         "old_model"),
        ("replay of the signed announcement of round 1", t.round, r1, "old_round"),
        ("signed model version 1, one byte changed: version 1 -> 3", t.model,
         _one_byte(v1_head, b"\xa7version\x01", b"\xa7version\x03"), "altered"),
        ("signed announcement of round 2, one byte changed: round 2 -> 5", t.round,
         _one_byte(r2, b"\xa5round\x02", b"\xa5round\x05"), "altered"),
    ]
    rows = []
    for attack, topic, payload, reason in live:
        before = {a.device_id: Counter(a.ignored) for a in running}
        f.publish(topic, payload)
        _wait(lambda r=reason, b=before: all(  # type: ignore[misc]
            a.ignored[r] == b[a.device_id][r] + 1 for a in running), attack)
        time.sleep(0.1)  # anything else the message caused would show by now
        for a in running:
            assert a.ignored - before[a.device_id] == Counter({reason: 1}), attack
            m = a.machine
            assert (m.run, m.model_version, m.model_sha256) == held[a.device_id][:3], attack
            assert m.weights is held[a.device_id][3], attack
            assert m.announcement is not None
            assert m.announcement.run == run
            assert a.updates_sent == sent[a.device_id], attack
        rows.append((f"{attack} (retained, {len(running)} running agents)", reason,
                     _observed(running, before) + "; model kept"))
    return rows


def _takeover(real: bytes, forged: GlobalModel) -> RoundAnnouncement:
    """An announcement of round 1 of the forged model's later run, unsigned."""
    return dataclasses.replace(codec.decode_as(real, RoundAnnouncement), run=forged.run,
                               round=1, base_version=0, model_sha256=forged.sha256, sig=None)


def _joining_attacks(f: Federation) -> list[Row]:
    """Devices that start while forgeries are retained (they hold no model yet)."""
    _, v0_parts = f.real(0)
    v1_head, v1_parts = f.real(1)
    r2 = f.real_round(2)
    forged = _forged_model(f.fed)
    t = f.topics
    f.publish(t.round, r2)  # the real announcement back (the running agents hold it)
    data = bytes(codec.decode_as(v1_parts[1], GlobalModel).tensors[0].data)
    changed = v1_parts[1].replace(data, _flip(data, len(data) // 2), 1)
    swapped = codec.encode(dataclasses.replace(codec.decode_as(v0_parts[1], GlobalModel),
                                               version=1, round=1))
    sig_at = v1_head.index(b"\xa7ed25519") + 10  # a byte inside the 64 signature bytes
    joining = [
        ("signed model version 1 with one weight byte changed (in part 1)",
         [t.model_part(1), t.model], [changed, v1_head], {"wrong_part": 1}),
        ("part 1 of version 0 swapped into version 1",
         [t.model_part(1), t.model], [swapped, v1_head], {"wrong_part": 1}),
        ("signed model version 1 with one byte of its signature changed",
         [t.model_part(1), t.model], [v1_parts[1], _flip(v1_head, sig_at)],
         {"bad_signature": 1}),
        ("unsigned all-zero model and announcement with a later run",
         [t.model, t.round], [codec.encode(forged), codec.encode(_takeover(r2, forged))],
         {"unsigned": 2}),
    ]
    rows = []
    for i, (attack, topics, payloads, counts) in enumerate(joining):
        for topic, payload in zip(topics, payloads, strict=True):
            f.publish(topic, payload)
        joiner = f.agent(f"late-{i}", train=False)
        _wait(lambda j=joiner, c=counts: all(  # type: ignore[misc]
            j.ignored[r] == n for r, n in c.items()), attack)
        time.sleep(0.3)
        refused = {r: n for r, n in joiner.ignored.items() if r != "evaluate_only"}
        assert refused == counts, attack
        assert (joiner.machine.model_version, joiner.machine.weights) == (-1, None), attack
        rows.append((f"{attack} (retained, a device joining)", ", ".join(counts),
                     ", ".join(f"{r} +{n}" for r, n in sorted(refused.items()))
                     + "; holds no model"))
    f.publish(t.round, r2)
    return rows


def test_every_agent_refuses_each_forgery_and_the_federation_goes_on(
        mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    with signed_federation(mosquitto, tmp_path) as f, running_aggregator(f.config) as agg:
        f.agg = agg
        running = [f.agent(f"dev-{i}") for i in range(AGENTS)]
        f.open_round(1)
        f.close_round()
        f.open_round(2)  # every agent holds version 1 and trained for round 2
        assert len(f.real(1)[1]) == 5  # 4 kB less the room kept for the signature
        held = {a.device_id: a.machine.model_sha256 for a in running}
        rows = _live_attacks(f, running)
        # The counts reach every agent's retained status (an operator's view).
        expected = {"unsigned": 2, "untrusted_key": 2, "old_model": 2, "old_round": 1,
                    "altered": 2}
        for a in running:
            _wait(lambda a=a: {r: f.status(a.device_id).ignored.get(r, 0)  # type: ignore[misc]
                               for r in expected} == expected,
                  f"{a.device_id}'s status", timeout=5 + 2 * STATUS_REFRESH_S)
        rows += _joining_attacks(f)
        assert {a.device_id: a.machine.model_sha256 for a in running} == held

        # The real aggregator goes on: every agent, old and new, takes its next models.
        f.close_round()
        for round_ in (3, 4):
            f.open_round(round_)
            f.close_round()
        assert all(a.machine.run == agg.run and a.machine.model_version == 4
                   for a in f.agents.values())
        assert agg.stats.rounds_completed == 4
        assert sum(agg.stats.rejected.values()) == 0, agg.stats.rejected
        for summary in f.rec.summaries():  # every round took every training agent's update
            assert {d for d, _ in summary.accepted} == {"pacer", *(a.device_id for a in running)}
        assert len(f.rec.summaries()) == 4
    _print_table("attacks on running and joining agents", rows)


def test_a_restarted_device_refuses_an_older_signed_model(
        mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    rows: list[tuple[str, str, str]] = []
    with signed_federation(mosquitto, tmp_path) as f, running_aggregator(f.config) as agg:
        f.agg = agg
        for i in range(AGENTS):
            f.agent(f"dev-{i}")
        for round_ in (1, 2):
            f.open_round(round_)
            f.close_round()
        f.open_round(3)  # dev-0 holds version 2 and sent its update for round 3
        v1_head, v1_parts = f.real(1)
        r2 = f.real_round(2)
        f.stop_agent("dev-0")
        record = tmp_path / "dev-0" / f"accepted-{f.fed}.json"
        assert record.exists()
        # The attacker replays version 1 and round 2, complete and retained.
        for i, part in enumerate(v1_parts):
            f.publish(f.topics.model_part(i), part)
        f.publish(f.topics.model, v1_head)
        f.publish(f.topics.round, r2)
        again = f.agent("dev-0")
        _wait(lambda: again.ignored["old_model"] == 1 + len(v1_parts)
              and again.ignored["old_round"] == 1, "the restarted device's refusals")
        time.sleep(0.3)
        assert (again.machine.model_version, again.machine.weights) == (-1, None)
        assert again.updates_sent == 0
        rows.append(("replay of signed version 1 and round 2 (retained) to a device restarted "
                     "while holding version 2", "old_model, old_round",
                     f"old_model +{again.ignored['old_model']} (manifest and "
                     f"{len(v1_parts)} parts), old_round +{again.ignored['old_round']}; "
                     "holds no model until version 3"))
        # Without the record the replay is a valid signed model: a fresh device takes it.
        control = f.agent("fresh", train=False)
        _wait(lambda: control.machine.model_version == 1, "a fresh device takes the replay")
        rows.append(("the same replay to a device with no record (control)", "accepted "
                     "(a valid signed model)", f"holds version {control.machine.model_version}"))
        f.close_round()
        f.open_round(4)
        f.close_round()
        assert again.machine.model_version == 4
        # Round 3's update was sent before the restart, round 4's by the restarted device.
        assert {d for d, _ in f.rec.summaries()[-1].accepted} == {"pacer", "dev-0", "dev-1",
                                                                   "dev-2"}
        assert sum(agg.stats.rejected.values()) == 0, agg.stats.rejected
    _print_table("replay after a restart", rows)
