"""Differential privacy with secure aggregation: each device adds its share of the noise
(fedmq.secagg.noise, docs/privacy.md "With secure aggregation")."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from test_secagg_round import Harness

from aggregator.privacy import DifferentialPrivacy, GaussianSum
from aggregator.secagg import Failed, Phase, SecAggRules, Unmasked
from aggregator.service import AggregatorService
from device_agent.secagg import DeviceSecAgg, Out, Skipped
from fedmq import codec
from fedmq.config import (
    AggregatorConfig,
    ModelConfig,
    PrivacyConfig,
    RoundsConfig,
    SamplingConfig,
    load_aggregator,
)
from fedmq.errors import ConfigError
from fedmq.memory_transport import MemoryHub, MemoryTransport
from fedmq.secagg import codec as sa_codec
from fedmq.secagg.messages import (
    SecAggDelivery,
    SecAggKeys,
    SecAggMasked,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
)
from fedmq.secagg.noise import CLIP_KEY, STD_KEY, DeviceNoise, device_std, fixed_clip
from fedmq.topics import Topics
from fedmq.wire import RoundAnnouncement

from secagg_fleet import FED, LAYERS, PARAMS, Clock, T

Z, CLIP = 1.1, 2.0


class Skipping(Harness):
    """A harness that records the steps devices refuse (``skipped``) instead of failing."""

    skipped: list[str]

    def send(self, out: Sequence[Out | Skipped]) -> None:
        self.skipped = getattr(self, "skipped", [])
        self.skipped += [m.reason for m in out if isinstance(m, Skipped)]
        super().send([m for m in out if not isinstance(m, Skipped)])


def _noisy_round(n: int, quorum: int, seed: int, *, silent: Collection[str] = (),
                 server_quorum: int | None = None, clip: float | None = None) -> Skipping:
    """One secure round of ``n`` devices whose deltas are zero: the sum is their noise
    (``server_quorum``: a server that unmasks with fewer survivors than the noise's quorum)."""
    std = device_std(Z, CLIP, quorum)
    least = quorum if server_quorum is None else server_quorum
    rules = SecAggRules(min_devices=least, max_devices=max(n, quorum), phase_s=30.0,
                        grace_s=1.0, clip=clip or fixed_clip(CLIP, std))
    h = Skipping(n, rules, seed=seed)
    h.silent["masked"] |= set(silent)
    noise = DeviceNoise(CLIP, std, quorum)
    for d in h.ids:
        h.send(h.devices[d].start(7, 3, noise))
    h.tick(rules.grace_s + 0.01)
    for _ in range(10):
        if h.agg.phase in (Phase.DONE, Phase.FAILED):
            break
        if h.agg.phase is Phase.MASKED and not h.devices[h.ids[0]]._sent_masked:
            for d in h.ids:  # weight 1000 is ignored: with noise every update weighs 1
                h.send(h.devices[d].set_update(np.zeros(h.agg.size - 1), 1000.0))
            continue
        h.tick(rules.phase_s)
    return h


@pytest.mark.parametrize(("n", "quorum"), [(8, 8), (12, 8)])
def test_the_unmasked_sum_carries_z_c_sqrt_n_over_m(n: int, quorum: int) -> None:
    """Over 12 rounds of zero deltas every coordinate of the unmasked sum is noise of standard
    deviation z·C·sqrt(n/m): Σ (x/s)² over the N values is chi-square with N degrees of
    freedom, inside its central 99.9%. A quarter or four times that variance is far outside."""
    sigma = Z * CLIP * math.sqrt(n / quorum)
    squares, total, count = 0.0, 0.0, 0
    for seed in range(12):
        h = _noisy_round(n, quorum, seed)
        (result,) = h.result
        assert isinstance(result, Unmasked), result
        assert len(result.survivors) == n
        assert result.total_weight == n  # every device weighs w' = 1
        x = result.weighted_sum
        squares += float(np.dot(x, x)) / sigma**2
        total += float(x.sum())
        count += x.size
    lo, hi = stats.chi2.ppf([0.0005, 0.9995], count)
    assert lo < squares < hi, (squares, count)
    assert abs(total) < 3.3 * sigma * math.sqrt(count)
    assert not lo < squares * 4 < hi
    assert not lo < squares / 4 < hi


def test_fewer_survivors_than_the_quorum_is_never_unmasked() -> None:
    h = _noisy_round(10, 8, seed=3, silent={"dev-00", "dev-01", "dev-02"})
    (result,) = h.result
    assert isinstance(result, Failed)
    assert result.reason == "below_quorum"


def test_devices_refuse_to_unmask_below_the_noise_quorum_and_a_narrow_clip() -> None:
    # a server that asks to unmask 5 survivors when the noise was calibrated for 8: every
    # survivor refuses, so the sum stays masked and the round fails
    h = _noisy_round(8, 8, seed=4, silent={"dev-00", "dev-01", "dev-02"}, server_quorum=4)
    assert h.skipped == ["below_dp_quorum"] * 5
    (failed,) = h.result
    assert isinstance(failed, Failed)
    assert failed.reason == "unmask_failed"
    # a roster whose fixed-point clip leaves no room for the noise: no masked input
    narrow = _noisy_round(4, 4, seed=5, clip=4.0)
    assert fixed_clip(CLIP, device_std(Z, CLIP, 4)) > 4.0
    assert narrow.skipped == ["narrow_clip"] * 4
    (failed,) = narrow.result
    assert isinstance(failed, Failed)
    assert failed.reason == "below_quorum"


def test_a_device_clips_its_delta_and_draws_unrepeatable_noise() -> None:
    noise = DeviceNoise(clip_norm=1.0, std=1e-9, quorum=2)
    out = noise.apply(np.full(100, 3.0))
    assert float(np.linalg.norm(out)) == pytest.approx(1.0, abs=1e-6)
    small = np.full(4, 0.1)
    np.testing.assert_allclose(noise.apply(small), small, atol=1e-7)
    loud = DeviceNoise(1.0, 1.0, 2)
    assert not np.array_equal(loud.apply(np.zeros(50)), loud.apply(np.zeros(50)))
    assert DeviceNoise.from_train({"epochs": 1}, 4) is None
    got = DeviceNoise.from_train({CLIP_KEY: 2.0, STD_KEY: 0.5}, 4)
    assert got == DeviceNoise(2.0, 0.5, 4)
    for bad in ({CLIP_KEY: 2.0}, {CLIP_KEY: 2.0, STD_KEY: -1.0},
                {CLIP_KEY: True, STD_KEY: 1.0}, {CLIP_KEY: float("nan"), STD_KEY: 1.0}):
        with pytest.raises(ValueError, match="announcement train"):
            DeviceNoise.from_train(bad, 4)


# ---------------------------------------------------------------- config and accountant


def _toml(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "aggregator.toml"
    path.write_text("[rounds]\nmin_updates = 8\nmax_updates = 20\n[privacy]\n"
                    "noise_multiplier = 1.0\nclip_norm = 2.0\nsecure_aggregation = true\n"
                    + extra)
    return path


def test_the_combination_is_accepted_and_an_overflowing_ring_is_one_line(
        tmp_path: Path) -> None:
    cfg = load_aggregator(_toml(tmp_path, ""))
    assert cfg.privacy.secure_aggregation
    assert cfg.privacy.noise_multiplier == 1.0
    path = tmp_path / "big.toml"
    path.write_text("[rounds]\nmin_updates = 2\nmax_updates = 100000\n[privacy]\n"
                    "noise_multiplier = 1000.0\nclip_norm = 1000.0\nsecure_aggregation = true\n")
    with pytest.raises(ConfigError) as info:
        load_aggregator(path)
    assert "overflow the 32-bit ring" in str(info.value)
    assert "\n" not in str(info.value)
    async_ = tmp_path / "async.toml"
    async_.write_text('[rounds]\nmode = "async"\nmin_updates = 2\n[privacy]\n'
                      "noise_multiplier = 1.0\nclip_norm = 2.0\nsecure_aggregation = true\n")
    with pytest.raises(ConfigError, match='works with \\[rounds\\] mode = "sync" only'):
        load_aggregator(async_)


def _cfg(secure: bool, rate: float = 0.5) -> AggregatorConfig:
    return AggregatorConfig(
        federation=FED, model=ModelConfig(layers=LAYERS, seed=3),
        rounds=RoundsConfig(min_updates=6, max_updates=6, deadline_s=600.0, max_rounds=0),
        sampling=SamplingConfig(rate=rate, seed=1),
        privacy=PrivacyConfig(noise_multiplier=Z, clip_norm=CLIP, secure_aggregation=secure))


def test_the_accountant_spends_what_central_dp_spends() -> None:
    central = DifferentialPrivacy(_cfg(False), None)
    secure = DifferentialPrivacy(_cfg(True), None)
    for r in range(1, 11):
        assert secure.finalized(r)["dp_epsilon"] == central.finalized(r)["dp_epsilon"]
    assert secure.epsilon > 0
    assert secure.noise.distributed
    assert not central.noise.distributed
    assert secure.noise.denominator == central.noise.denominator == 6
    # the aggregator adds nothing of its own; a device's share is z·C/sqrt(m)
    assert not secure.noise.noise(10).any()
    assert secure.noise.device_share_std() == pytest.approx(Z * CLIP / math.sqrt(6))
    assert GaussianSum(Z, CLIP, 6, b"\0" * 32).device_share_std() == pytest.approx(
        Z * CLIP / math.sqrt(6))


# ---------------------------------------------------------------- the service end to end


def _send(tr: MemoryTransport, outs: Sequence[Out | Skipped]) -> None:
    for m in outs:
        if isinstance(m, Skipped):
            continue
        topic = {SecAggKeys: T.keys, SecAggShares: T.shares, SecAggMasked: T.masked,
                 SecAggReveal: T.reveal}[type(m)](m.device)
        tr.publish(topic, sa_codec.encode(m))


def _pump(tr: MemoryTransport, dev: dict[str, DeviceSecAgg], seen: list[int]) -> None:
    """The devices answer what reached them; each opened round's announcement must carry the
    clip and a device's share, which they take part with (zero deltas)."""
    while not tr.inbox.empty():
        msg = tr.inbox.get()
        if msg.topic == Topics(FED).round:
            ann = codec.decode(msg.payload)
            assert isinstance(ann, RoundAnnouncement)
            if ann.open and ann.round not in seen:
                seen.append(ann.round)
                noise = DeviceNoise.from_train(ann.train, ann.min_updates)
                assert noise == DeviceNoise(CLIP, Z * CLIP / math.sqrt(6), 6)
                for d in dev.values():
                    _send(tr, d.start(ann.run, ann.round, noise))
                    _send(tr, d.set_update(np.zeros(PARAMS), 10.0))
            continue
        m = sa_codec.decode(msg.payload)
        for name, d in dev.items():
            if isinstance(m, SecAggRoster):
                _send(tr, d.on_roster(m))
            elif isinstance(m, SecAggDelivery) and m.device == name:
                _send(tr, d.on_delivery(m))
            elif isinstance(m, SecAggUnmask) and name in m.survivors:
                _send(tr, d.on_unmask(m))


def test_the_service_announces_the_share_and_divides_the_noised_sum_by_the_quorum() -> None:
    """Six devices with zero deltas, 20 rounds: the announcement (signed part: ``train``)
    carries the clip and each device's share; the model moves by the devices' noise only, over
    the fixed denominator m: every coordinate of a round's delta has sd z·C·sqrt(n/m)/m."""
    hub = MemoryHub()
    cfg = _cfg(True, rate=1.0)
    agg = AggregatorService(cfg, MemoryTransport(hub), clock=Clock())
    agg.start()
    agg.stop()
    tr = MemoryTransport(hub)
    tr.start()
    for topic in (Topics(FED).round, T.roster, T.unmask, f"{T.base}/deliver/+"):
        tr.subscribe(topic)
    dev = {d: DeviceSecAgg(FED, d) for d in (f"d{i}" for i in range(6))}
    rounds, seen = 20, list[int]()
    flat_before = np.concatenate([v.ravel() for v in agg.model.values()]).astype(np.float64)
    deltas = []
    for _ in range(100_000):
        if agg.version >= rounds:
            break
        _pump(tr, dev, seen)
        version = agg.version
        if agg.transport.inbox.empty():
            agg.step()
        while not agg.transport.inbox.empty():
            agg.step(agg.transport.inbox.get())
        if agg.version > version:
            flat = np.concatenate([v.ravel() for v in agg.model.values()]).astype(np.float64)
            deltas.append(flat - flat_before)
            flat_before = flat
    assert agg.version == rounds, agg.version
    assert agg.privacy is not None
    assert agg.privacy.accountant.rounds == rounds
    sigma = Z * CLIP / 6  # n = m = 6: the central noise over the quorum
    x = np.concatenate(deltas)
    squares = float(np.dot(x, x)) / sigma**2
    lo, hi = stats.chi2.ppf([0.0005, 0.9995], x.size)
    assert lo < squares < hi, (squares, x.size)
    assert not lo < squares * 2 < hi  # the aggregator's own noise on top would double it
