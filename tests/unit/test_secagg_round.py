"""The aggregator's secure-aggregation round with real device machines, every message through
the codec: dropouts at each step, chunks, hostile messages, crash and replay, and a check that
nothing the aggregator keeps or logs holds one device's unmasked update."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from aggregator.secagg import (
    Action,
    Dropped,
    Failed,
    Phase,
    Publish,
    SecAggRound,
    SecAggRules,
    Unmasked,
)
from device_agent.secagg import DeviceSecAgg, Out, Skipped
from fedmq.secagg import codec
from fedmq.secagg.fixedpoint import U32, ring_sum
from fedmq.secagg.messages import (
    SecAggDelivery,
    SecAggKeys,
    SecAggMasked,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggTopics,
    SecAggUnmask,
)

FED = "fed"
T = SecAggTopics(FED)
PARAMS = 300


def seeded(seed: int) -> random.Random:
    return random.Random(seed)


@dataclass
class Harness:
    """N devices and one aggregator round on a fake clock; ``log`` is what a WAL would hold."""

    n: int
    rules: SecAggRules
    chunk_bytes: int = 0
    seed: int = 0
    now: float = 1000.0
    log: list[tuple[str, str, bytes, float]] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    result: list[Unmasked | Failed] = field(default_factory=list)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        self.ids = [f"dev-{i:02d}" for i in range(self.n)]
        self.devices = {d: DeviceSecAgg(FED, d, max_chunk_bytes=self.chunk_bytes,
                                        random=np.random.default_rng(self.seed * 100 + i).bytes)
                        for i, d in enumerate(self.ids)}
        self.updates = {d: (rng.normal(0, 0.3, PARAMS), float(rng.uniform(10, 90)))
                        for d in self.ids}
        self.agg = SecAggRound(FED, 7, 3, size=PARAMS + 1, rules=self.rules, now=self.now)
        self.silent: dict[str, set[str]] = {"keys": set(), "shares": set(), "masked": set(),
                                           "reveal": set()}

    def plain(self, d: str) -> U32:
        assert self.agg.fixed is not None
        values, w = self.updates[d]
        return self.agg.fixed.encode(values, w)

    def fixed_w(self, d: str) -> float:
        return self.agg.fixed.norm_weight(self.updates[d][1])

    def send(self, out: Sequence[Out | Skipped]) -> None:
        for m in out:
            if isinstance(m, Skipped):
                raise AssertionError(f"device skipped: {m.reason}")
            step = {SecAggKeys: "keys", SecAggShares: "shares", SecAggMasked: "masked",
                    SecAggReveal: "reveal"}[type(m)]
            if m.device in self.silent[step]:
                continue
            self.deliver_to_agg(getattr(T, step)(m.device), codec.encode(m))

    def deliver_to_agg(self, topic: str, payload: bytes) -> None:
        actions = self.agg.receive(topic, payload, self.now)
        if not any(isinstance(a, Dropped) for a in actions):
            self.log.append(("msg", topic, payload, self.now))
        self.apply(actions)

    def tick(self, dt: float) -> None:
        self.now += dt
        actions = self.agg.tick(self.now)
        if actions:
            self.log.append(("tick", "", b"", self.now))
        self.apply(actions)

    def apply(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Dropped):
                self.dropped.append(a)
            elif isinstance(a, Unmasked | Failed):
                self.result.append(a)
            elif isinstance(a, Publish):
                self.route(a)

    def route(self, p: Publish) -> None:
        msg = codec.decode(p.payload)
        for d in self.ids:
            dev = self.devices[d]
            if isinstance(msg, SecAggRoster):
                self.send(dev.on_roster(msg) if d in msg_devices(msg) else [])
            elif isinstance(msg, SecAggDelivery) and msg.device == d:
                self.send(dev.on_delivery(msg))
            elif isinstance(msg, SecAggUnmask) and d in msg.survivors:
                self.send(dev.on_unmask(msg))

    def run(self) -> None:
        for d in self.ids:
            self.send(self.devices[d].start(7, 3))
        self.tick(self.rules.grace_s + 0.01)  # close advertising once the quorum waited grace
        trained = False
        for _ in range(10):  # silent devices: phases close at their deadlines
            if self.agg.phase in (Phase.DONE, Phase.FAILED):
                break
            if self.agg.phase is Phase.MASKED and not trained:
                trained = True  # training finishes after the shares went out
                for d in self.ids:
                    self.send(self.devices[d].set_update(*self.updates[d]))
                continue
            self.tick(self.rules.phase_s)


def msg_devices(msg: SecAggRoster) -> set[str]:
    return {d for d, _, _ in msg.devices}


RULES = SecAggRules(min_devices=10, max_devices=20, phase_s=30.0, grace_s=5.0)


def _survivor_sum(h: Harness, result: Unmasked) -> None:
    assert h.agg.fixed is not None
    want, wsum = h.agg.fixed.decode_sum(ring_sum([h.plain(d) for d in result.survivors]))
    assert np.array_equal(result.weighted_sum, want)  # the same integers, decoded
    assert result.total_weight == wsum
    ref = sum(h.updates[d][0] * h.fixed_w(d) for d in result.survivors)
    np.testing.assert_allclose(result.weighted_sum, ref, atol=len(result.survivors) * 2.0**-20)


@pytest.mark.parametrize("chunk_bytes", [0, 256])
def test_acceptance_dropouts_after_and_before_masked_input(chunk_bytes: int) -> None:
    h = Harness(20, RULES, chunk_bytes=chunk_bytes)
    order = list(np.random.default_rng(1).permutation(h.ids))
    before, after = set(order[:2]), set(order[2:5])
    h.silent["masked"] |= before
    h.silent["reveal"] |= after
    h.run()
    assert len(h.result) == 1
    result = h.result[0]
    assert isinstance(result, Unmasked), result
    assert set(result.survivors) == set(h.ids) - before
    assert set(result.dropped) == before
    _survivor_sum(h, result)
    # only answers that came after the sum was already unmasked
    assert {d.reason for d in h.dropped} <= {"late"}


def test_devices_silent_at_every_step() -> None:
    h = Harness(16, SecAggRules(min_devices=8, max_devices=20, phase_s=30.0, grace_s=1.0))
    h.silent["keys"] |= {"dev-00"}
    h.silent["shares"] |= {"dev-01", "dev-02"}
    h.silent["masked"] |= {"dev-03"}
    h.silent["reveal"] |= {"dev-04", "dev-05"}
    h.run()
    result = h.result[0]
    assert isinstance(result, Unmasked), result
    assert set(result.survivors) == set(h.ids) - {"dev-00", "dev-01", "dev-02", "dev-03"}
    assert result.dropped == ("dev-03",)
    _survivor_sum(h, result)


def test_failures_below_quorum_and_incomplete_chunks() -> None:
    h = Harness(6, SecAggRules(min_devices=8, max_devices=20, phase_s=30.0))
    h.run()
    assert isinstance(h.result[0], Failed)
    assert h.result[0].reason == "below_quorum"

    h = Harness(8, SecAggRules(min_devices=4, max_devices=20, phase_s=30.0), chunk_bytes=400)
    real_send = h.send

    def lose_last_chunk(out: Sequence[Out | Skipped]) -> None:
        real_send([m for m in out if not (isinstance(m, SecAggMasked) and m.device == "dev-05"
                                          and m.offset + len(m.data) // 4 == PARAMS + 1)])

    h.send = lose_last_chunk  # type: ignore[method-assign]
    h.run()
    assert isinstance(h.result[0], Failed)
    assert h.result[0].reason == "incomplete_masked"


def hostile(h: Harness, rnd: random.Random) -> list[tuple[str, bytes]]:
    """Messages the round must refuse, built from what has been logged so far."""
    out: list[tuple[str, bytes]] = []
    for _, topic, payload, _ in [e for e in h.log if e[0] == "msg"][-3:]:
        msg = codec.decode(payload)
        raw = bytearray(payload)
        raw[rnd.randrange(len(raw))] ^= 0xFF
        out.append((topic, bytes(raw)))  # flipped byte: malformed or refused
        out.append((topic.rsplit("/", 1)[0] + "/dev-99", payload))  # another device's topic
        out.append((topic, payload))  # redelivered: duplicate
        if isinstance(msg, SecAggMasked):
            half = SecAggMasked(msg.federation, msg.run, msg.round, msg.device, msg.offset,
                                msg.size, bytes(msg.data)[:4])
            out.append((topic, codec.encode(half)))  # overlaps what was added
        other = SecAggKeys(FED, 7, 4, "dev-00", bytes(32), bytes(32))
        out.append((T.keys("dev-00"), codec.encode(other)[:-3]))
    out.append(("fedmq/v1/fed/secagg/keys", b""))
    out.append((T.reveal("nobody"), b"\x80"))
    return out


def test_hostile_messages_are_counted_and_change_nothing() -> None:
    clean = Harness(12, SecAggRules(min_devices=6, max_devices=20, phase_s=30.0, grace_s=1.0))
    clean.silent["masked"] |= {"dev-02"}
    clean.run()
    h = Harness(12, SecAggRules(min_devices=6, max_devices=20, phase_s=30.0, grace_s=1.0))
    h.silent["masked"] |= {"dev-02"}
    rnd = seeded(5)
    real = h.deliver_to_agg
    sent = [0]

    def with_noise(topic: str, payload: bytes) -> None:
        real(topic, payload)
        if h.agg.phase in (Phase.DONE, Phase.FAILED):
            return
        for t, p in hostile(h, rnd):
            before = len(h.dropped)
            actions = h.agg.receive(t, p, h.now)
            sent[0] += 1
            h.apply(actions)
            assert len(h.dropped) == before + 1, (t, actions)

    h.deliver_to_agg = with_noise  # type: ignore[method-assign]
    h.run()
    assert sent[0] > 100
    reasons = {d.reason for d in h.dropped}
    assert {"malformed", "duplicate", "wrong_device", "overlap"} <= reasons
    a, b = clean.result[0], h.result[0]
    assert isinstance(a, Unmasked)
    assert isinstance(b, Unmasked)
    assert np.array_equal(a.weighted_sum, b.weighted_sum)


def replay(h: Harness, upto: int) -> SecAggRound:
    fresh = SecAggRound(FED, 7, 3, size=PARAMS + 1, rules=h.rules, now=1000.0)
    for kind, topic, payload, now in h.log[:upto]:
        if kind == "msg":
            fresh.receive(topic, payload, now)
        else:
            fresh.tick(now)
    return fresh


def test_replay_of_the_log_rebuilds_the_round_at_every_point() -> None:
    h = Harness(12, SecAggRules(min_devices=6, max_devices=20, phase_s=30.0, grace_s=1.0),
                chunk_bytes=300)
    h.silent["masked"] |= {"dev-01"}
    h.silent["reveal"] |= {"dev-07"}
    h.run()
    final = h.result[0]
    assert isinstance(final, Unmasked)
    for cut in range(len(h.log) + 1):
        r = replay(h, cut)
        # continuing from the rebuilt state with the rest of the log gives the same result
        out: list[Action] = []
        for kind, topic, payload, now in h.log[cut:]:
            out += r.receive(topic, payload, now) if kind == "msg" else r.tick(now)
        done = [a for a in out if isinstance(a, Unmasked)]
        if cut < len(h.log):
            assert len(done) == 1
            assert np.array_equal(done[0].weighted_sum, final.weighted_sum)
        assert not any(isinstance(a, Dropped) for a in out)


def test_no_unmasked_individual_update_is_kept_or_logged() -> None:
    """The aggregator's stored state (accumulator, shares, intake) and everything it would log
    never contain one device's fixed-point vector, its float update, or its self-mask seed
    together with its mask key."""
    h = Harness(12, SecAggRules(min_devices=6, max_devices=20, phase_s=30.0, grace_s=1.0),
                chunk_bytes=512)
    h.silent["masked"] |= {"dev-03"}
    seen_acc: list[bytes] = []
    real = h.deliver_to_agg

    def watch(topic: str, payload: bytes) -> None:
        real(topic, payload)
        if h.agg.acc.size:
            seen_acc.append(h.agg.acc.tobytes())

    h.deliver_to_agg = watch  # type: ignore[method-assign]
    h.run()
    assert isinstance(h.result[0], Unmasked)
    wal = b"".join(p for _, _, p, _ in h.log)
    for d in h.ids:
        vec = h.plain(d).astype("<u4").tobytes()
        values = h.updates[d][0]
        for needle in (vec[4:68], values.astype("<f4").tobytes()[:64],
                       values.astype("<f8").tobytes()[:64]):
            assert needle not in wal
            assert all(needle not in acc for acc in seen_acc)
    for acc in seen_acc:
        for d in h.ids:
            assert acc != h.plain(d).tobytes()
    # shares: for no device does the aggregator hold both its b and its s shares
    assert not set(h.agg.b_shares) & set(h.agg.s_shares)
    assert h.agg.acc.size == 0  # the masked sum is dropped once unmasked
