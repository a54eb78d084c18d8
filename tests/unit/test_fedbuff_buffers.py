"""Asynchronous buffered rounds (FedBuff): the buffer machine on a fake clock, the staleness
weight against a numpy reference through the aggregator's fold, and crash recovery."""

from __future__ import annotations

import math
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.async_rounds import (
    AsyncRoundMachine,
    AsyncRules,
    machine_for,
    staleness_weight,
    summary_metrics,
)
from aggregator.rounds import (
    Accept,
    CloseRound,
    ExtendDeadline,
    OpenRound,
    Reject,
    RoundMachine,
    Tick,
    UpdateOffered,
)
from aggregator.service import AggregatorService
from fedmq import codec, compression
from fedmq.config import (
    AggregatorConfig,
    DurabilityConfig,
    ModelConfig,
    RobustConfig,
    RoundsConfig,
    load_aggregator,
)
from fedmq.errors import ConfigError
from fedmq.memory_transport import MemoryHub, MemoryTransport
from fedmq.transport import Message
from fedmq.wire import ModelUpdate, RoundAnnouncement

RULES = AsyncRules(buffer_size=3, max_staleness=2, min_updates=2, deadline_s=60.0)


def up(device: str, base: int, now: float = 0.0, *, round_: int = 1,
       uid: str | None = None) -> UpdateOffered:
    return UpdateOffered(device, round_, base, uid or f"{device}@{base}", now)


def opened(rules: AsyncRules = RULES) -> AsyncRoundMachine:
    m = AsyncRoundMachine(rules)
    m.handle(OpenRound(round=1, base_version=0, now=0.0))
    return m


def close_buffer(m: AsyncRoundMachine, version: int, now: float) -> None:
    """Fill the open buffer with fresh updates and open the next on ``version``."""
    assert m.round is not None
    assert m.version is not None
    while m.accepted < m.async_rules.buffer_size:
        m.handle(up(f"fill{m.accepted}", m.version, now, round_=m.round))
    m.handle(OpenRound(round=m.round + 1, base_version=version, now=now))


# ---------------------------------------------------------------- the weight


@pytest.mark.parametrize(("kind", "s", "exponent", "expected"), [
    ("sqrt", 0, 0.5, 1.0), ("sqrt", 3, 0.5, 0.5), ("sqrt", 8, 9.0, 1 / 3),
    ("poly", 1, 1.0, 0.5), ("poly", 3, 2.0, 1 / 16), ("poly", 5, 0.0, 1.0),
    ("constant", 0, 0.5, 1.0), ("constant", 1000, 0.5, 1.0)])
def test_staleness_weight(kind: str, s: int, exponent: float, expected: float) -> None:
    assert staleness_weight(kind, s, exponent) == pytest.approx(expected, rel=1e-15)  # type: ignore[arg-type]


def test_staleness_weight_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="staleness"):
        staleness_weight("sqrt", -1)
    with pytest.raises(ValueError, match="'sqrt', 'poly' or 'constant'"):
        staleness_weight("linear", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_updates"):
        AsyncRules(buffer_size=2, max_staleness=1, min_updates=3)
    with pytest.raises(ValueError, match="max_staleness"):
        AsyncRules(buffer_size=2, max_staleness=-1)


# ---------------------------------------------------------------- the buffer machine


def test_a_buffer_closes_at_buffer_size_with_closed_by_buffer() -> None:
    m = opened()
    assert m.handle(up("a", 0, 1.0)) == [Accept("a", "a@0")]
    assert m.handle(up("b", 0, 2.0)) == [Accept("b", "b@0")]
    assert m.handle(up("c", 0, 3.0)) == [Accept("c", "c@0"), CloseRound(1, 0, 3, "buffer")]


def test_staleness_window_and_future_versions() -> None:
    m = opened()
    close_buffer(m, 1, 1.0)
    close_buffer(m, 2, 2.0)
    close_buffer(m, 3, 3.0)  # buffer 4 folds into version 3
    assert m.handle(up("old", 0, 4.0, round_=1)) == [Reject("old", "old@0", "stale")]
    assert m.handle(up("s2", 1, 4.0, round_=2)) == [Accept("s2", "s2@1")]
    assert m.weight(1) == pytest.approx(1 / math.sqrt(3))
    assert m.handle(up("new", 4, 4.0, round_=4)) == [Reject("new", "new@4", "unknown_round")]
    assert m.handle(up("ahead", 3, 4.0, round_=5)) == [
        Reject("ahead", "ahead@3", "unknown_round")]
    assert m.handle(up("s0", 3, 4.0, round_=4)) == [Accept("s0", "s0@3")]
    assert m.buffer_staleness == (2, 0)
    assert summary_metrics(m) == {"staleness_mean": 1.0, "staleness_max": 2.0}


def test_a_device_counts_once_per_base_version_across_buffers() -> None:
    m = opened(AsyncRules(buffer_size=2, max_staleness=3))
    m.handle(up("a", 0, 1.0))
    m.handle(up("b", 0, 1.0))  # closes buffer 1
    m.handle(OpenRound(round=2, base_version=1, now=1.0))
    assert m.handle(up("a", 0, 2.0, uid="a-again")) == [Reject("a", "a-again", "duplicate")]
    assert m.handle(up("x", 0, 2.0, uid="a@0")) == [Reject("x", "a@0", "duplicate")]
    assert m.handle(up("a", 1, 2.0, round_=2)) == [Accept("a", "a@1")]
    assert m.handle(up("a", 1, 2.0, round_=2, uid="other")) == [
        Reject("a", "other", "duplicate")]


def test_memory_stays_bounded_by_buffer_size_times_max_staleness() -> None:
    rules = AsyncRules(buffer_size=4, max_staleness=3)
    m = opened(rules)
    for v in range(1, 200):
        close_buffer(m, v, float(v))
        assert m.remembered <= rules.buffer_size * (rules.max_staleness + 1)


def test_the_deadline_publishes_a_partial_buffer_or_extends_it() -> None:
    m = opened()
    assert m.handle(Tick(59.0)) == []
    assert m.handle(Tick(60.0)) == [ExtendDeadline(1, 120.0, 1)]  # nothing in: extended
    m.handle(up("a", 0, 61.0))
    assert m.handle(Tick(119.0)) == []
    assert m.handle(Tick(120.0)) == [ExtendDeadline(1, 180.0, 2)]  # below min_updates
    m.handle(up("b", 0, 121.0))
    assert m.handle(Tick(179.9)) == []
    assert m.handle(Tick(180.0)) == [CloseRound(1, 0, 2, "deadline")]
    for t in range(181, 400, 30):  # never abandoned, however long
        assert not m.handle(Tick(float(t)))


def test_export_restore_keeps_duplicates_out_after_a_recovery() -> None:
    m = opened(AsyncRules(buffer_size=2, max_staleness=2))
    m.handle(up("a", 0, 1.0))
    m.handle(up("b", 0, 1.0))
    m.handle(OpenRound(round=2, base_version=1, now=1.0))
    saved = m.export()
    fresh = AsyncRoundMachine(m.async_rules)
    fresh.handle(OpenRound(round=2, base_version=1, now=1.0))
    fresh.restore(saved)
    assert fresh.handle(up("a", 0, 2.0, uid="resent")) == [Reject("a", "resent", "duplicate")]
    assert fresh.handle(up("c", 0, 2.0)) == [Accept("c", "c@0")]
    with pytest.raises(ValueError, match="before any update"):
        fresh.restore(saved)


def test_a_retired_partial_update_is_a_duplicate_later() -> None:
    m = opened()
    close_buffer(m, 1, 1.0)
    m.retire("a", "half", 0)
    assert m.handle(up("a", 0, 2.0, uid="half")) == [Reject("a", "half", "duplicate")]


def test_machine_for_follows_the_mode() -> None:
    sync = machine_for(RoundsConfig())
    assert type(sync) is RoundMachine
    m = machine_for(RoundsConfig(mode="async", buffer_size=5, max_staleness=4, min_updates=2,
                                 staleness_weight="poly", staleness_exponent=1.0))
    assert isinstance(m, AsyncRoundMachine)
    assert (m.rules.max_updates, m.async_rules.max_staleness) == (5, 4)
    assert summary_metrics(sync) == {}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=1, max_size=60))
def test_accepted_updates_are_within_the_window_and_never_repeat(
        plan: list[tuple[int, bool]]) -> None:
    """Whatever arrives, every accepted update is 0..max_staleness stale, a device's base
    versions never repeat, and each buffer has at most buffer_size updates."""
    rules = AsyncRules(buffer_size=3, max_staleness=2)
    m = opened(rules)
    seen: set[tuple[str, int]] = set()
    for i, (back, repeat) in enumerate(plan):
        assert m.version is not None
        assert m.round is not None
        base = max(0, m.version - back)
        device = "rep" if repeat else f"d{i}"
        actions = m.handle(up(device, base, float(i), round_=m.round, uid=f"u{i}"))
        if isinstance(actions[0], Accept):
            assert 0 <= m.version - base <= rules.max_staleness
            assert (device, base) not in seen
            seen.add((device, base))
            assert m.accepted <= rules.buffer_size
        else:
            assert isinstance(actions[0], Reject)
            assert actions[0].reason in {"stale", "duplicate"}
            assert (m.version - base > rules.max_staleness) == (actions[0].reason == "stale")
        if any(isinstance(a, CloseRound) for a in actions):
            m.handle(OpenRound(round=m.round + 1, base_version=m.version + 1, now=float(i)))


# ---------------------------------------------------------------- through the aggregator

FED = "buffed"
SHAPES = {"dense0.weight": (5, 3), "dense0.bias": (3,)}
K = 8
MAX_STALENESS = 3


def _config(*, weight: str = "sqrt", exponent: float = 0.5, state_dir: Path | None = None,
            every: int = 0, buffer_size: int = K) -> AggregatorConfig:
    return AggregatorConfig(
        federation=FED, model=ModelConfig(layers=[5, 3], seed=3),
        rounds=RoundsConfig(mode="async", buffer_size=buffer_size, max_staleness=MAX_STALENESS,
                            min_updates=1, deadline_s=600.0, max_rounds=0,
                            staleness_weight=weight,  # type: ignore[arg-type]
                            staleness_exponent=exponent),
        robust=RobustConfig(mode="off"),
        durability=DurabilityConfig(state_dir=None if state_dir is None else str(state_dir),
                                    snapshot_every_updates=every, snapshot_every_s=0))


def _message(device: str, round_: int, base: int, delta: dict[str, np.ndarray], *, n: int,
             uid: str | None = None) -> Message:
    u = ModelUpdate(federation=FED, device_id=device, round=round_, base_version=base,
                    update_id=uid or uuid.uuid4().hex, num_examples=n,
                    tensors=compression.encode_all(delta))
    return Message(f"fedmq/v1/{FED}/update/{device}", codec.encode(u), qos=1)


def _aggregator(config: AggregatorConfig, hub: MemoryHub | None = None,
                clock: float = 1000.0) -> AggregatorService:
    agg = AggregatorService(config, MemoryTransport(hub or MemoryHub()), clock=lambda: clock)
    agg.start()
    agg.stop()  # driven by hand with step()
    return agg


def _advance(agg: AggregatorService, versions: int) -> None:
    """Close ``versions`` buffers with fresh filler updates."""
    rng = np.random.default_rng(99)
    for _ in range(versions):
        v = agg.version
        for i in range(K):
            delta = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in SHAPES.items()}
            agg.step(_message(f"fill{i}", agg.round, v, delta, n=1))
        assert agg.version == v + 1


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, K - 1),
       weight=st.sampled_from(["sqrt", "poly", "constant"]),
       exponent=st.floats(0.0, 3.0, allow_nan=False))
def test_staleness_weighted_mean_equals_numpy(seed: int, n: int, weight: str,
                                              exponent: float) -> None:
    """Random deltas, example counts, staleness (some beyond the window) and arrival order:
    the buffer's mean delta is Σ nᵢ·s(τᵢ)·Δᵢ / Σ nᵢ over the accepted ones (rel. err < 1e-9)."""
    agg = _aggregator(_config(weight=weight, exponent=exponent))
    _advance(agg, MAX_STALENESS + 2)
    v = agg.version
    rng = np.random.default_rng(seed)
    num = np.zeros(sum(math.prod(s) for s in SHAPES.values()))
    den = 0.0
    msgs = []
    stale = 0
    for i in range(n):
        tau = int(rng.integers(0, MAX_STALENESS + 3))
        delta = {k: rng.normal(0, rng.uniform(0.01, 10), s).astype(np.float32)
                 for k, s in SHAPES.items()}
        examples = int(rng.integers(1, 1000))
        msgs.append(_message(f"d{i}", agg.round - tau, v - tau, delta, n=examples))
        if tau > MAX_STALENESS:
            stale += 1
            continue
        if weight == "sqrt":
            factor = 1.0 / np.sqrt(1.0 + tau)
        elif weight == "poly":
            factor = np.power(1.0 + tau, -exponent)
        else:
            factor = 1.0
        flat = np.concatenate([delta[k].astype(np.float64).ravel() for k in SHAPES])
        num += examples * factor * flat
        den += examples
    for i in rng.permutation(n):
        agg.step(msgs[i])
    assert agg.stats.rejected["stale"] == stale
    if stale == n:
        return
    got = agg.strategy.mean_delta()  # type: ignore[attr-defined]
    want = num / den
    assert np.max(np.abs(got - want)) <= 1e-9 * np.max(np.abs(want))


def test_a_buffer_publishes_a_version_with_its_staleness_summary() -> None:
    agg = _aggregator(_config(buffer_size=2))
    delta = {"dense0.weight": np.full((5, 3), 1 / 64, np.float32),
             "dense0.bias": np.zeros(3, np.float32)}
    agg.step(_message("a", 1, 0, delta, n=1))
    agg.step(_message("b", 1, 0, delta, n=1))
    assert agg.version == 1
    agg.step(_message("c", 1, 0, delta, n=3))  # one version stale: weight 1/sqrt(2)
    agg.step(_message("d", 2, 1, delta, n=1))
    assert agg.version == 2
    summary = agg.last_summary
    assert summary is not None
    assert summary.closed_by == "buffer"
    assert summary.metrics["staleness_mean"] == 0.5
    assert summary.metrics["staleness_max"] == 1.0
    anns = [codec.decode_as(m.payload, RoundAnnouncement)
            for m in agg.transport.published  # type: ignore[attr-defined]
            if m.topic.endswith("/round")]
    assert {(a.mode, a.max_staleness, a.max_updates) for a in anns} == {
        ("async", MAX_STALENESS, 2)}


@pytest.mark.parametrize("every", [0, 1, 3], ids=["buffer-snapshots", "each-update", "every-3"])
def test_a_crash_anywhere_gives_the_model_of_the_run_without_one(tmp_path: Path,
                                                                 every: int) -> None:
    """kill -9 after any message, restart on the same state, the broker redelivers the last
    message: same model bits as the uninterrupted run, every update counted once."""
    rng = np.random.default_rng(5)
    plan: list[Message] = []
    # Buffers of 3 on versions 0..4; each has a fresh update and stale ones (one too stale).
    for v in range(5):
        for i, tau in enumerate([0, 1, 2, 4] if v >= 4 else [0, min(v, 1), 0, 0][:3]):
            delta = {k: (rng.integers(-64, 64, s) / 1024).astype(np.float32)
                     for k, s in SHAPES.items()}
            plan.append(_message(f"d{i}-{v}", v + 1, v - tau, delta, n=1 + i,
                                 uid=uuid.UUID(int=v * 10 + i).hex))
    config = _config(buffer_size=3, every=every, state_dir=tmp_path / "ref")
    reference = _aggregator(config)
    for m in plan:
        reference.step(m)
    assert reference.stats.rejected == {"stale": 1}
    final = reference.version
    for crash_after in range(1, len(plan)):
        state = tmp_path / f"s{crash_after}"
        hub = MemoryHub()
        first = _aggregator(_config(buffer_size=3, every=every, state_dir=state), hub)
        for m in plan[:crash_after]:
            first.step(m)
        assert first.wal is not None
        first.wal.drop()  # kill -9: only what step() synced survives
        second = _aggregator(_config(buffer_size=3, every=every, state_dir=state), hub)
        assert second.version == first.version
        second.step(plan[crash_after - 1])  # redelivered
        for m in plan[crash_after:]:
            second.step(m)
        assert second.version == final
        assert second.stats.rejected["duplicate"] + second.stats.rejected["stale"] >= 1
        for name, value in reference.model.items():
            np.testing.assert_array_equal(second.model[name], value)
        assert second.wal is not None
        second.wal.close()
    assert reference.wal is not None
    reference.wal.close()


def test_the_norm_bound_bootstraps_within_one_buffer() -> None:
    """The bootstrap holds updates back until its norms are in: at most one buffer's worth
    (with [rounds] max_updates, unused in async mode, it would wait for 8 here)."""
    agg = _aggregator(replace(_config(buffer_size=4), robust=RobustConfig()))
    assert agg.bound.bootstrap == 4


@pytest.mark.parametrize(("text", "message"), [
    ('[rounds]\nmode = "async"\nbuffer_size = 3\nmin_updates = 4',
     r"\[rounds\] min_updates = 4 must be <= \[rounds\] buffer_size = 3$"),
    ('[rounds]\nmode = "async"\n[task]\nkind = "statistics"\ncolumns = ["t"]\nbins = [0, 1, 4]',
     r'\[rounds\] mode = "async" only applies with \[task\] kind = "train" \(it is '
     r'"statistics"\)$'),
    ('[rounds]\nmode = "buffered"', r"\[rounds\] mode = \"buffered\""),
    ("[rounds]\nmax_staleness = -1", r"\[rounds\] max_staleness = -1 must be"),
])
def test_bad_async_settings_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_aggregator(path)
    assert "\n" not in str(info.value)
