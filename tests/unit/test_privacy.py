"""Differential privacy (DP-FedAvg, aggregator/privacy.py): the accountant against dp-accounting
itself, the noise's calibrated standard deviation, the fixed denominator, determinism across a
restart, the budget stop, and the config's refusals."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from aggregator.privacy import PLD_GRID, Accountant, GaussianSum, load_secret, norm_config
from aggregator.service import AggregatorService
from aggregator.spec import ModelSpec
from aggregator.strategies import STRATEGIES, FedAvg
from fedmq import codec
from fedmq.compression import encode_all
from fedmq.config import (
    AggregatorConfig,
    DurabilityConfig,
    ModelConfig,
    PrivacyConfig,
    RoundsConfig,
    SamplingConfig,
    StrategyConfig,
    load_aggregator,
)
from fedmq.errors import ConfigError
from fedmq.memory_transport import MemoryHub, MemoryTransport
from fedmq.transport import Message
from fedmq.wire import ModelUpdate

FED = "dp"


def independent_epsilon(q: float, z: float, rounds: int, delta: float,
                        grid: float = PLD_GRID) -> float:
    """dp-accounting used directly, the way its own examples compose a DP-SGD run."""
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(z)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=grid)
    acc.compose(event, rounds)
    return float(acc.get_epsilon(delta))


# ---------------------------------------------------------------- the accountant


@pytest.mark.parametrize(("q", "z", "rounds", "delta"), [
    (1.0, 1.0, 20, 1e-5), (0.5, 1.0, 30, 1e-5), (0.1, 0.8, 50, 1e-6), (1.0, 2.0, 5, 1e-3),
    (0.02, 1.1, 100, 1e-5)])
def test_epsilon_after_r_rounds_is_dp_accountings(q: float, z: float, rounds: int,
                                                  delta: float) -> None:
    acc = Accountant(q, z, delta)
    for _ in range(rounds):
        spent = acc.spend()
    assert acc.rounds == rounds
    assert spent == pytest.approx(independent_epsilon(q, z, rounds, delta), rel=1e-9)
    # dp-accounting's default (finer) grid: the coarser one is an upper bound, and close.
    fine = independent_epsilon(q, z, rounds, delta, grid=1e-4)
    assert fine <= spent * (1 + 1e-9)
    assert spent <= fine * 1.01


def test_segments_with_another_noise_compose_both() -> None:
    acc = Accountant(1.0, 1.0, 1e-5)
    for _ in range(3):
        acc.spend()
    acc.noise_multiplier = 2.0  # a restart with another [privacy] noise_multiplier
    for _ in range(4):
        acc.spend()
    assert acc.export() == [[1.0, 1.0, 3], [1.0, 2.0, 4]]
    ref = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_GRID)
    ref.compose(dp_accounting.GaussianDpEvent(1.0), 3)
    ref.compose(dp_accounting.GaussianDpEvent(2.0), 4)
    assert acc.epsilon() == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    restored = Accountant(1.0, 2.0, 1e-5)
    restored.restore(acc.export())
    assert restored.epsilon() == acc.epsilon()


# ---------------------------------------------------------------- the noise

BASE = {"w": np.zeros((40, 25), np.float32), "b": np.zeros(10, np.float32)}


def test_the_noise_has_the_calibrated_standard_deviation() -> None:
    """200 rounds of zero updates: every coordinate of every round's mean delta is noise of
    standard deviation s = z·C/m. Σ (x / s)² over the N values is chi-square with N degrees of
    freedom; it must fall within the central 99.9% of that distribution."""
    z, clip, quorum, n_updates, rounds = 1.3, 0.7, 4, 6, 200
    spec = ModelSpec.from_weights(BASE)
    s = FedAvg(spec)
    noise = GaussianSum(z, clip, quorum, b"\1" * 32)
    s.noisy = noise
    sigma = z * clip / quorum
    assert noise.mean_std == pytest.approx(sigma)
    total, squares, count = 0.0, 0.0, 0
    zero = encode_all({k: np.zeros_like(v) for k, v in BASE.items()})
    for r in range(1, rounds + 1):
        noise.at(run=7, round_=r)
        s.init(BASE)
        for _ in range(n_updates):  # more updates than the quorum: the noise is unchanged
            s.fold(zero, 1.0)
        x = s.mean_delta()
        total += float(x.sum())
        squares += float(np.dot(x, x)) / sigma**2
        count += x.size
    lo, hi = stats.chi2.ppf([0.0005, 0.9995], count)
    assert lo < squares < hi, (squares, count)
    # Mean zero: the sum of N values of sd sigma is within 3.3 sd of 0 (99.9%).
    assert abs(total) < 3.3 * sigma * math.sqrt(count)
    # A noise of half or twice that size is far outside the interval (the test has power).
    assert not lo < squares * 4 < hi
    assert not lo < squares / 4 < hi


def test_the_noise_is_the_same_for_the_same_round_and_secret_only() -> None:
    a, b, other = (GaussianSum(1.0, 1.0, 2, s) for s in (b"k" * 32, b"k" * 32, b"j" * 32))
    for g in (a, b, other):
        g.at(3, 5)
    first = a.noise(100)
    np.testing.assert_array_equal(first, b.noise(100))
    np.testing.assert_array_equal(first, a.noise(100))
    assert not np.array_equal(first, other.noise(100))
    a.at(3, 6)
    assert not np.array_equal(first, a.noise(100))
    a.at(4, 5)  # another run: another noise for the same round number
    assert not np.array_equal(first, a.noise(100))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_the_mean_is_the_sum_over_the_quorum_for_every_strategy(name: str) -> None:
    """Five unit-weight updates, quorum 2: the strategy steps with (Σ Δ + noise) / 2, not the
    weighted mean."""
    spec = ModelSpec.from_weights(BASE)
    s, plain = STRATEGIES[name](spec), STRATEGIES[name](spec)
    noise = GaussianSum(0.5, 1.0, 2, b"x" * 32)
    noise.at(1, 1)
    s.noisy = noise
    deltas = [{k: np.full(v.shape, 0.01 * (i + 1), np.float32) for k, v in BASE.items()}
              for i in range(5)]
    s.init(BASE)
    plain.init(BASE)
    for d in deltas:
        s.fold(encode_all(d), 1.0)
    expected = (sum(np.concatenate([d["w"].ravel(), d["b"]]).astype(np.float64)
                    for d in deltas) + noise.noise(spec.total)) / 2
    np.testing.assert_allclose(s.mean_delta(), expected, rtol=1e-12, atol=1e-15)
    # The step is the strategy's own: fed the same mean delta, it gives the same model.
    plain.fold(encode_all({"w": expected[:1000].reshape(40, 25).astype(np.float32),
                           "b": expected[1000:].astype(np.float32)}), 1.0)
    got, ref = s.finalize(), plain.finalize()
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, atol=1e-7)


def test_the_secret_is_created_once_private_and_checked(tmp_path: Path) -> None:
    first = load_secret(tmp_path)
    assert len(first) == 32
    assert load_secret(tmp_path) == first
    assert (tmp_path / "dp_noise.key").stat().st_mode & 0o777 == 0o600
    (tmp_path / "dp_noise.key").write_bytes(b"short")
    with pytest.raises(Exception, match="not a 32-byte noise secret"):
        load_secret(tmp_path)
    assert load_secret(None) != load_secret(None)


# ---------------------------------------------------------------- in the service


def config(state: Path | None = None, target: float | None = None, rate: float = 1.0,
           strategy: Literal["fedavg", "fedadam"] = "fedavg") -> AggregatorConfig:
    return AggregatorConfig(
        federation=FED, model=ModelConfig(layers=[6, 4], seed=2),
        rounds=RoundsConfig(min_updates=2, max_updates=3),
        sampling=SamplingConfig(rate=rate),
        strategy=StrategyConfig(name=strategy),
        durability=DurabilityConfig(state_dir=str(state) if state else None),
        privacy=PrivacyConfig(noise_multiplier=1.1, clip_norm=0.5, target_epsilon=target,
                              delta=1e-5))


def start(cfg: AggregatorConfig) -> AggregatorService:
    agg = AggregatorService(cfg, MemoryTransport(MemoryHub()), clock=lambda: 1000.0)
    agg.start()
    agg.stop()  # driven by hand
    return agg


def play_round(agg: AggregatorService, r: int, devices: int = 3) -> None:
    """Three updates; device 2's is 10x the clip (it is clipped), and claims many examples."""
    for d in range(devices):
        rng = np.random.default_rng(100 * r + d)
        delta = {k: (rng.standard_normal(v.shape) * 0.05 * (10 if d == 2 else 1))
                 .astype(np.float32) for k, v in agg.model.items()}
        u = ModelUpdate(federation=FED, device_id=f"d{d}", round=agg.round,
                        base_version=agg.version, update_id=f"u{r}-{d}",
                        num_examples=1000 if d == 2 else 3, tensors=encode_all(delta))
        agg.step(Message(f"fedmq/v1/{FED}/update/d{d}", codec.encode(u), qos=1))


def test_every_summary_carries_the_accountants_epsilon() -> None:
    agg = start(config(rate=0.5))
    for r in range(1, 5):
        play_round(agg, r)
        assert agg.last_summary is not None
        m = agg.last_summary.metrics
        assert m["dp_epsilon"] == pytest.approx(independent_epsilon(0.5, 1.1, r, 1e-5), rel=1e-9)
        assert m["dp_rounds"] == r
        assert m["dp_delta"] == 1e-5
        assert m["dp_noise_std"] == pytest.approx(1.1 * 0.5 / 2)
        assert m["norm_bound"] == 0.5
        assert m["clipped_updates"] >= 1


def test_the_run_stops_before_the_round_that_would_pass_the_target(
        caplog: pytest.LogCaptureFixture) -> None:
    eps3, eps4 = (independent_epsilon(1.0, 1.1, r, 1e-5) for r in (3, 4))
    agg = start(config(target=(eps3 + eps4) / 2))
    with caplog.at_level(logging.WARNING, logger="aggregator.service"):
        for r in range(1, 4):
            assert not agg.done.is_set()
            play_round(agg, r)
    assert agg.done.is_set()
    assert agg.version == 3
    assert agg.round == 3
    assert agg.privacy is not None
    assert agg.privacy.epsilon == pytest.approx(eps3, rel=1e-9)
    line = [rec.getMessage() for rec in caplog.records if "privacy budget" in rec.getMessage()]
    assert len(line) == 1
    assert f"{eps4:.4g}" in line[0]
    assert "stopping after 3 noisy rounds" in line[0]


def test_a_first_round_over_the_target_never_runs() -> None:
    agg = start(config(target=independent_epsilon(1.0, 1.1, 1, 1e-5) / 2))
    assert agg.done.is_set()
    assert agg.round == 0
    assert agg.version == 0


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_a_restart_continues_the_same_epsilon_and_the_same_bits(tmp_path: Path,
                                                                 strategy: Any) -> None:
    """Rounds 1-3 and two updates of round 4; then a copy of the state directory (snapshot,
    write-ahead log, noise secret) is what a kill leaves. The original goes on to round 5; an
    aggregator restarted from the copy replays the log and plays the same rest: the same
    models, bit for bit, and the same epsilon."""
    straight = start(config(tmp_path / "a", strategy=strategy))
    for r in range(1, 4):
        play_round(straight, r)
    play_round(straight, 4, devices=2)  # in the log, the round not closed
    assert straight.version == 3
    assert straight.privacy is not None
    eps3 = straight.privacy.epsilon
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    play_round(straight, 4)  # d0 and d1 again are duplicates; d2 closes the round
    play_round(straight, 5)
    restarted = start(config(tmp_path / "b", strategy=strategy))
    assert restarted.privacy is not None
    assert (restarted.version, restarted.round, restarted.privacy.epsilon) == (3, 4, eps3)
    play_round(restarted, 4)
    play_round(restarted, 5)
    assert restarted.privacy.epsilon == straight.privacy.epsilon
    assert restarted.privacy.accountant.rounds == straight.privacy.accountant.rounds == 5
    for k, v in straight.model.items():
        np.testing.assert_array_equal(restarted.model[k], v)
    for agg in (straight, restarted):
        assert agg.wal is not None
        agg.wal.close()


# ---------------------------------------------------------------- config: refused in one line

REFUSED = [
    ("[privacy]\nnoise_multiplier = 1.0\n", "needs [privacy] clip_norm"),
    ("[privacy]\nclip_norm = 1.0\n", "[privacy] clip_norm = 1.0 only applies with"),
    ("[privacy]\ntarget_epsilon = 3.0\n", "[privacy] target_epsilon = 3.0 only applies with"),
    ("[robust]\nclip_norm = 2.0\n[privacy]\nnoise_multiplier = 1.0\nclip_norm = 1.0\n",
     "[robust] clip_norm = 2.0 contradicts [privacy] clip_norm = 1.0"),
    ('[robust]\nmode = "off"\n[privacy]\nnoise_multiplier = 1.0\nclip_norm = 1.0\n',
     '[robust] mode = "off" leaves the updates unclipped'),
    ("[robust]\nmax_norm = 0.5\n[privacy]\nnoise_multiplier = 1.0\nclip_norm = 1.0\n",
     "[privacy] clip_norm = 1.0 must be <= [robust] max_norm = 0.5"),
    ('[rounds]\nmode = "async"\nmin_updates = 1\n[privacy]\nnoise_multiplier = 1.0\n'
     "clip_norm = 1.0\n", 'works with [rounds] mode = "sync" only'),
    ("[sampling]\nrate = 0.0\n[privacy]\nnoise_multiplier = 1.0\nclip_norm = 1.0\n",
     "needs [sampling] rate > 0"),
    ("[privacy]\nnoise_multiplier = 1.0\nclip_norm = 1.0\ndelta = 0.0\n",
     "[privacy] delta = 0.0 must be"),
    ("[privacy]\nnoise_multiplier = inf\nclip_norm = 1.0\n", "[privacy] noise_multiplier = inf"),
    ("[privacy]\nnoise_multiplier = 1.0\nclip_norm = 1.0\nepsilon = 3\n", "epsilon"),
]


@pytest.mark.parametrize(("text", "says"), REFUSED)
def test_contradictory_privacy_configs_are_one_line(tmp_path: Path, text: str,
                                                    says: str) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_aggregator(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert says in message
    assert "\n" not in message


def test_the_command_exits_2_on_a_contradictory_privacy_config(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(REFUSED[3][0])
    run = subprocess.run([sys.executable, "-m", "fedmq.cli", "aggregator", "--config",
                          str(path)], capture_output=True, text=True, timeout=60, check=False,
                         env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2])))
    assert run.returncode == 2, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert "contradicts [privacy] clip_norm" in run.stderr


def test_equal_clips_and_the_privacy_clip_as_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text("[robust]\nclip_norm = 1.5\n[privacy]\nnoise_multiplier = 0.8\n"
                    "clip_norm = 1.5\ntarget_epsilon = 8.0\n")
    cfg = load_aggregator(path)
    assert norm_config(cfg).clip_norm == 1.5
    assert norm_config(load_aggregator(write(tmp_path, "[privacy]\nnoise_multiplier = 1.0\n"
                                                       "clip_norm = 0.3\n"))).clip_norm == 0.3


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "other.toml"
    path.write_text(text)
    return path


VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70), st.booleans(),
    st.text(max_size=5), st.lists(st.integers(0, 3), max_size=2), st.none())


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return {math.inf: "inf", -math.inf: "-inf"}.get(v, "nan" if math.isnan(v) else repr(v))
    if isinstance(v, str):
        return json.dumps(v)
    return str(v)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(privacy=st.dictionaries(
    st.sampled_from(["noise_multiplier", "clip_norm", "target_epsilon", "delta",
                     "secure_aggregation", "noise", "clip"]), VALUES, max_size=5),
       robust_clip=st.one_of(st.none(), st.floats(0.01, 10.0)),
       mode=st.sampled_from(["clip", "reject", "off"]))
def test_hostile_privacy_sections_load_or_fail_in_one_line(
        tmp_path: Path, privacy: dict[str, object], robust_clip: float | None,
        mode: str) -> None:
    lines = [f"{k} = {toml_value(v)}" for k, v in privacy.items() if v is not None]
    robust = f'[robust]\nmode = "{mode}"\n' + (
        f"clip_norm = {robust_clip!r}\n" if robust_clip is not None else "")
    path = write(tmp_path, robust + "[privacy]\n" + "\n".join(lines) + "\n")
    problem = ""
    try:
        cfg = load_aggregator(path)
    except ConfigError as exc:
        problem = str(exc)
    if problem:  # "PATH: [section] key ..." or "PATH is not valid TOML: ..."
        assert problem.startswith(str(path))
        assert "\n" not in problem
        return
    p = cfg.privacy
    if p.noise_multiplier > 0:  # what loaded is usable as it says
        assert p.clip_norm is not None
        assert norm_config(cfg).clip_norm == p.clip_norm
        assert mode != "off"
        assert 0 < p.delta < 1
        assert p.secure_aggregation is False
        GaussianSum(p.noise_multiplier, p.clip_norm, cfg.rounds.min_updates, b"k" * 32)


@pytest.mark.parametrize("saved", [[[0.0, 1.0, 3]], [[1.5, 1.0, 3]], [[1.0, -1.0, 3]],
                                   [[1.0, float("nan"), 3]], [[1.0, 1.0, -2]]])
def test_a_damaged_privacy_record_in_a_snapshot_is_refused(saved: list[list[float]]) -> None:
    with pytest.raises(ConfigError, match="privacy record"):
        Accountant(1.0, 1.0, 1e-5).restore(saved)


def test_prometheus_shows_the_epsilon_spent() -> None:
    from aggregator.exporter import Exporter

    agg = start(config())
    for r in range(1, 3):
        play_round(agg, r)
    text = Exporter(agg, "127.0.0.1:0", worker_alive=lambda: True).metrics().decode()
    assert agg.privacy is not None
    assert f"fedmq_dp_epsilon {agg.privacy.epsilon!r}" in text
    assert "fedmq_dp_delta 1e-05" in text
    assert "fedmq_dp_rounds_total 2.0" in text
