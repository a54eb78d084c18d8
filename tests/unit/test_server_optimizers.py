"""FedAvgM, FedAdam, FedYogi, FedAdagrad (and FedAvg) against the numpy references in
``server_opt_reference``, over several rounds so the optimizer state evolves."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from server_opt_reference import ServerOptimizer, mean_delta

from aggregator.service import AggregatorService
from aggregator.spec import ModelSpec
from aggregator.strategies import (
    STRATEGIES,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    Strategy,
    StreamingFold,
    build_strategy,
)
from aggregator.wal import Snapshot
from fedmq import codec
from fedmq.compression import encode, encode_all
from fedmq.config import (
    STRATEGY_DEFAULTS,
    AggregatorConfig,
    ModelConfig,
    RobustConfig,
    RoundsConfig,
    StrategyConfig,
    load_aggregator,
)
from fedmq.errors import ProtocolError
from fedmq.memory_transport import MemoryHub, MemoryTransport
from fedmq.transport import Message
from fedmq.wire import ModelUpdate, Tensor

F32 = npt.NDArray[np.float32]
Weights = dict[str, F32]
NAMES = ["fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"]


# ---------------------------------------------------------------- against the references

#: Deltas are multiples of 2**-12 up to 2**8 in magnitude, weights integers, clip scales
#: multiples of 1/64: every ``Σ w·s·Δ`` is exact in float64 whatever the arrival order, so the
#: mean delta is the correctly rounded quotient on both sides and the comparison is about the
#: optimizers, not the fold's rounding (``test_strategies`` covers that).
GRID = 2.0**-12


#: One round: updates, their weights, clip scales, arrival order, and whether folded batched.
Round = tuple[list[Weights], list[float], list[float], list[int], bool]


@dataclasses.dataclass
class Run:
    """A base model and several rounds of updates, weights, clip scales and arrival orders."""

    base: Weights
    rounds: list[Round]


@st.composite
def runs(draw: st.DrawFn) -> Run:
    names = draw(st.lists(st.text("abcdefgh", min_size=1, max_size=4), min_size=1, max_size=3,
                          unique=True))
    shapes = [draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=4))
              for _ in names]
    base = {n: draw(hnp.arrays(np.float32, s, elements=st.floats(-4, 4, width=32)))
            for n, s in zip(names, shapes, strict=True)}
    ks = st.integers(-(2**20), 2**20)
    rounds = []
    for _ in range(draw(st.integers(1, 4))):
        k = draw(st.integers(1, 5))
        updates = [{n: (draw(hnp.arrays(np.int64, s, elements=ks)) * GRID).astype(np.float32)
                    for n, s in zip(names, shapes, strict=True)} for _ in range(k)]
        weights = [float(draw(st.integers(1, 1000))) for _ in range(k)]
        scales = [draw(st.sampled_from([1.0, 1.0, 0.5, 0.0, 3 / 64, 63 / 64])) for _ in range(k)]
        rounds.append((updates, weights, scales, draw(st.permutations(range(k))),
                       draw(st.booleans())))
    return Run(base, rounds)


def fold_round(s: StreamingFold, base: Weights, round_: Round) -> None:
    """Open a round on ``base`` and fold its updates in their order, one by one or batched."""
    updates, weights, scales, order, batched = round_
    s.init(base)
    folds = [(encode_all(updates[i]), weights[i], scales[i]) for i in order]
    if batched:
        s.fold_many(folds)
    else:
        for tensors, w, scale in folds:
            s.fold(tensors, w, scale)


def knobs(name: str) -> st.SearchStrategy[dict[str, float]]:
    """Settings for ``name``: its defaults and random values in each key's range."""
    ranges = {
        "server_lr": st.sampled_from([1.0, 0.01, 0.1, 0.7, 3.0]),
        "momentum": st.sampled_from([0.0, 0.9, 0.99]),
        "beta1": st.sampled_from([0.0, 0.9, 0.5]),
        "beta2": st.sampled_from([0.0, 0.99, 0.999]),
        "tau": st.sampled_from([1e-3, 1e-6, 1e-9, 0.5]),
    }
    keys = STRATEGY_DEFAULTS[name]
    return st.one_of(st.just(dict(keys)),
                     st.fixed_dictionaries({k: ranges[k] for k in keys}))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_each_strategy_equals_its_numpy_reference_round_after_round(
        name: str, data: st.DataObject) -> None:
    run, kw = data.draw(runs()), data.draw(knobs(name))
    s = STRATEGIES[name](ModelSpec.from_weights(run.base), **kw)
    ref = ServerOptimizer(name, **kw)
    base = run.base
    for round_ in run.rounds:
        fold_round(s, base, round_)
        updates, weights, scales = round_[:3]
        expected = ref.step(base, mean_delta(updates, weights, scales))
        flat = np.concatenate([e.ravel() for e in expected.values()])
        # The acceptance: relative error below 1e-9 in float64, before the float32 rounding
        # (the same operations in the same order: in fact the same bits).
        np.testing.assert_allclose(s.model64(), flat, rtol=1e-9, atol=0)
        new = s.finalize()
        s.commit()
        for n, e in expected.items():
            np.testing.assert_array_equal(new[n], e.astype(np.float32))
        base = {n: a.copy() for n, a in new.items()}


@st.composite
def loose_runs(draw: st.DrawFn) -> Run:
    """Like ``runs``, with any float32 deltas, real weights and clip scales (no exact sums)."""
    shapes = [draw(hnp.array_shapes(min_dims=1, max_dims=2, min_side=1, max_side=5))
              for _ in range(2)]
    names = ["a", "b"]
    base = {n: draw(hnp.arrays(np.float32, sh, elements=st.floats(-4, 4, width=32)))
            for n, sh in zip(names, shapes, strict=True)}
    values = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
    rounds = []
    for _ in range(draw(st.integers(1, 3))):
        k = draw(st.integers(1, 5))
        updates = [{n: draw(hnp.arrays(np.float32, sh, elements=values))
                    for n, sh in zip(names, shapes, strict=True)} for _ in range(k)]
        weights = [draw(st.floats(1e-3, 1e4)) for _ in range(k)]
        scales = [draw(st.floats(0.0, 1.0)) for _ in range(k)]
        rounds.append((updates, weights, scales, draw(st.permutations(range(k))),
                       draw(st.booleans())))
    return Run(base, rounds)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_with_any_deltas_the_fold_is_within_rounding_and_the_step_is_the_reference(
        name: str, data: st.DataObject) -> None:
    """Arbitrary floats: the fold's ``Σ w·s·Δ`` depends on arrival order only by rounding (a
    few ulps of ``Σ w·s·|Δ|``); fed that same Δ, every optimizer's step is its reference's,
    relative error < 1e-9, through rounds in which the moments carry the rounding along."""
    run, kw = data.draw(loose_runs()), data.draw(knobs(name))
    spec = ModelSpec.from_weights(run.base)
    s = STRATEGIES[name](spec, **kw)
    ref = ServerOptimizer(name, **kw)
    base = run.base
    for round_ in run.rounds:
        fold_round(s, base, round_)
        updates, weights, scales = round_[:3]
        got = s.mean_delta()
        exact = mean_delta(updates, weights, scales)
        magnitude = mean_delta([{n: np.abs(u[n]) for n in u} for u in updates], weights, scales)
        flat = np.concatenate([exact[n].ravel() for n in spec.names])
        bound = np.concatenate([magnitude[n].ravel() for n in spec.names]) * (16 * 2.0**-52)
        assert np.all(np.abs(got - flat) <= bound)
        expected = ref.step(base, spec.split(got))
        np.testing.assert_allclose(
            s.model64(), np.concatenate([expected[n].ravel() for n in spec.names]),
            rtol=1e-9, atol=0)
        base = s.finalize()
        s.commit()


@pytest.mark.parametrize(("name", "bound"), [
    ("fedadam", 0.1 / math.sqrt(0.01 * (1 - 0.81 / 0.99))),  # about 2.345
    ("fedadagrad", 0.1 / math.sqrt(1 - 0.81)),  # about 0.229
], ids=["fedadam", "fedadagrad"])
@settings(max_examples=60, deadline=None)
@given(deltas=st.lists(hnp.arrays(np.float32, 3, elements=st.floats(
    -2.0**100, 2.0**100, width=32, allow_subnormal=False)), min_size=1, max_size=12))
def test_an_adaptive_step_is_at_most_a_fixed_multiple_of_server_lr(
        name: str, bound: float, deltas: list[F32]) -> None:
    """docs/robustness.md: at the default betas no coordinate moves by more than ``bound ·
    server_lr`` in a round, however large the updates (Cauchy-Schwarz on m and v)."""
    s = STRATEGIES[name](ModelSpec.from_weights({"w": np.zeros(3, np.float32)}))
    base = {"w": np.zeros(3, np.float32)}
    for d in deltas:
        s.init(base)
        s.fold((encode("w", d),), 1.0)
        step = s.model64() - base["w"].astype(np.float64)
        assert np.all(np.abs(step) <= bound * s.server_lr * (1 + 1e-12))
        base = s.finalize()
        s.commit()


# ---------------------------------------------------------------- settings and the factory


def test_constructor_defaults_are_the_config_defaults() -> None:
    for name, cls in STRATEGIES.items():
        params = inspect.signature(cls).parameters
        assert {k: params[k].default for k in params if k != "spec"} == STRATEGY_DEFAULTS[name]


@pytest.mark.parametrize("name", NAMES)
def test_build_strategy_makes_the_named_strategy_with_its_settings(name: str) -> None:
    spec = ModelSpec.from_weights(BASE)
    s = build_strategy(StrategyConfig(name=name), spec)  # type: ignore[arg-type]
    assert type(s) is STRATEGIES[name]
    assert s.name == name
    tuned = StrategyConfig(name=name, server_lr=0.25)  # type: ignore[arg-type]
    assert "server_lr 0.25" in build_strategy(tuned, spec).describe()


def test_describe_names_every_setting() -> None:
    spec = ModelSpec.from_weights(BASE)
    assert FedAvg(spec).describe() == "fedavg (server_lr 1)"
    assert FedAvgM(spec).describe() == "fedavgm (server_lr 1, momentum 0.9)"
    assert FedAdam(spec).describe() == "fedadam (server_lr 0.01, beta1 0.9, beta2 0.99, tau 0.001)"
    assert FedYogi(spec, tau=1e-6).describe() == (
        "fedyogi (server_lr 0.01, beta1 0.9, beta2 0.99, tau 1e-06)")
    assert FedAdagrad(spec).describe() == "fedadagrad (server_lr 0.1, beta1 0.9, tau 0.001)"


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (FedAvgM, {"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        (FedAvgM, {"momentum": -0.1}, r"momentum must be in \[0, 1\)"),
        (FedAdam, {"beta1": math.nan}, r"beta1 must be in \[0, 1\)"),
        (FedYogi, {"beta2": 1.0}, r"beta2 must be in \[0, 1\)"),
        (FedAdagrad, {"tau": 0.0}, "tau must be finite and > 0"),
        (FedAdam, {"tau": math.inf}, "tau must be finite and > 0"),
        (FedYogi, {"server_lr": -1.0}, "server_lr must be finite and > 0"),
    ],
)
def test_settings_out_of_range_are_refused(cls: Any, kwargs: dict[str, float],
                                           message: str) -> None:
    with pytest.raises(ValueError, match=message):
        cls(ModelSpec.from_weights(BASE), **kwargs)


# ---------------------------------------------------------------- state: finalize, commit, snapshot


BASE: Weights = {"w": np.array([[1, 2], [3, 4]], np.float32), "b": np.array([0.5], np.float32)}


def update(w: float, b: float) -> tuple[Tensor, ...]:
    return (encode("w", np.full((2, 2), w)), encode("b", [b]))


def play(s: Strategy, rounds: list[list[tuple[float, float, float]]],
         base: Weights = BASE) -> Weights:
    """Fold each round's ``(w value, b value, weight)`` updates, finalize and commit."""
    for ups in rounds:
        s.init(base)
        for w, b, weight in ups:
            s.fold(update(w, b), weight)
        base = s.finalize()
        s.commit()
    return base


ROUNDS = [[(1.0, -2.0, 3.0), (0.5, 1.0, 1.0)], [(-1.0, 0.25, 2.0)], [(0.0, 4.0, 1.0)]]


def test_fedadam_worked_example() -> None:
    s = FedAdam(ModelSpec.from_weights(BASE))
    new = play(s, [[(0.5, 0.0, 1.0)]])
    # Δ = 0.5: m = 0.1·0.5 = 0.05, v = 0.99·1e-6 + 0.01·0.25 = 0.00250099,
    # step = 0.01·0.05 / (√0.00250099 + 0.001) = 0.0005 / 0.0510099 = 0.0098020...
    step = 0.01 * 0.05 / (math.sqrt(0.00250099) + 0.001)
    assert step == pytest.approx(0.0098020, abs=1e-7)
    np.testing.assert_allclose(new["w"], BASE["w"] + step, rtol=1e-7)
    np.testing.assert_array_equal(new["b"], BASE["b"])  # Δ = 0 there: m = 0, no step
    np.testing.assert_allclose(s.state()["v"], [0.00250099] * 4 + [0.99e-6], rtol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_an_abandoned_round_leaves_the_optimizer_state_as_it_was(name: str) -> None:
    spec = ModelSpec.from_weights(BASE)
    kept, abandoning = STRATEGIES[name](spec), STRATEGIES[name](spec)
    base = play(kept, ROUNDS[:1])
    assert play(abandoning, ROUNDS[:1]).keys() == base.keys()
    before = {k: v.copy() for k, v in abandoning.state().items()}
    abandoning.init(base)
    abandoning.fold(update(100.0, -100.0), 5.0)
    abandoning.finalize()  # ... and the round is abandoned: no commit
    for k, v in abandoning.state().items():
        np.testing.assert_array_equal(v, before[k])
    # The next round goes on as if the abandoned one had never been.
    got, expected = play(abandoning, ROUNDS[1:], base), play(kept, ROUNDS[1:], base)
    for n, a in expected.items():
        np.testing.assert_array_equal(got[n], a)


def test_finalize_twice_gives_the_same_model_and_commit_needs_a_finalize() -> None:
    s = FedYogi(ModelSpec.from_weights(BASE))
    base = play(s, ROUNDS[:2])
    s.init(base)
    s.fold(update(0.25, 0.5), 2.0)
    first, second = s.finalize(), s.finalize()
    for n in first:
        np.testing.assert_array_equal(first[n], second[n])
    s.commit()
    with pytest.raises(ProtocolError, match="commit without finalize"):
        s.commit()
    s.init(base)
    with pytest.raises(ProtocolError, match="commit without finalize"):
        s.commit()


@pytest.mark.parametrize("name", NAMES)
def test_state_through_a_snapshot_gives_the_same_next_rounds(name: str, tmp_path: Path) -> None:
    spec = ModelSpec.from_weights(BASE)
    running = STRATEGIES[name](spec)
    base = play(running, ROUNDS[:2])
    Snapshot(base, {"strategy": name}, None, running.state()).save(tmp_path)
    snap = Snapshot.load(tmp_path)
    assert snap is not None
    assert set(snap.state) == set(running.state())
    restored = STRATEGIES[name](spec)
    restored.load_state(snap.state)
    got, expected = play(restored, ROUNDS[2:], dict(snap.model)), play(running, ROUNDS[2:], base)
    for n, a in expected.items():
        np.testing.assert_array_equal(got[n], a)


def test_a_snapshot_without_state_loads_with_none() -> None:
    assert Snapshot(BASE, {}).state == {}
    FedAvg(ModelSpec.from_weights(BASE)).load_state({})


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"m": np.zeros(5)}, r"fedadam keeps the state \['m', 'v'\]; got \['m'\]"),
        ({"m": np.zeros(5), "v": np.zeros(4)}, "'v' has 4 values"),
        ({"m": np.zeros(5), "v": np.full(5, np.nan)}, "non-finite"),
    ],
)
def test_load_state_refuses_state_that_does_not_fit(arrays: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FedAdam(ModelSpec.from_weights(BASE)).load_state(arrays)


def test_every_strategy_is_a_streaming_fold_with_model_sized_state() -> None:
    spec = ModelSpec.from_weights(BASE)
    sizes = {}
    for name, cls in STRATEGIES.items():
        s = cls(spec)
        assert isinstance(s, StreamingFold)
        assert all(a.shape == (spec.total,) and a.dtype == np.float64
                   for a in s.state().values())
        sizes[name] = len(s.state())
    assert sizes == {"fedavg": 0, "fedavgm": 1, "fedadam": 2, "fedyogi": 2, "fedadagrad": 2}


# ---------------------------------------------------------------- in the service


def _round_one(max_change_norm: float) -> AggregatorService:
    """A fedadam aggregator (no broker, no durability) after round 1's two updates."""
    fed = "opt"
    config = AggregatorConfig(
        federation=fed, model=ModelConfig(layers=[3, 2], seed=1),
        rounds=RoundsConfig(min_updates=2, max_updates=2, max_rounds=0),
        robust=RobustConfig(mode="off", max_change_norm=max_change_norm),
        strategy=StrategyConfig(name="fedadam"))
    agg = AggregatorService(config, MemoryTransport(MemoryHub()), clock=lambda: 1000.0)
    agg.start()
    agg.stop()  # driven by hand below
    for d in range(2):
        delta = {k: np.full(v.shape, 0.25 * (d + 1), np.float32) for k, v in agg.model.items()}
        u = ModelUpdate(federation=fed, device_id=f"d{d}", round=1, base_version=0,
                        update_id=f"u{d}", num_examples=1, tensors=encode_all(delta))
        agg.step(Message(f"fedmq/v1/{fed}/update/d{d}", codec.encode(u), qos=1))
    return agg


def test_the_service_commits_the_moments_only_with_a_published_model() -> None:
    published = _round_one(max_change_norm=100.0)
    assert published.version == 1
    assert np.all(published.strategy.state()["m"] > 0)
    abandoned = _round_one(max_change_norm=1e-6)  # the step is about 0.01 per coordinate
    assert abandoned.version == 0
    assert abandoned.stats.abandoned["change_too_large"] == 1
    np.testing.assert_array_equal(abandoned.strategy.state()["m"], 0.0)
    np.testing.assert_array_equal(abandoned.strategy.state()["v"], 1e-3**2)


def test_the_strategy_configs_in_the_docs_load_as_they_say(tmp_path: Path) -> None:
    """docs/configuration.md has a block for each strategy, stating its defaults; the README's
    block is FedAdam's defaults too."""
    root = Path(__file__).resolve().parents[2]

    def strategy_blocks(page: str) -> list[StrategyConfig]:
        text = (root / page).read_text()
        blocks = [b for b in re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)
                  if b.startswith("[strategy]\n")]
        out = []
        for i, block in enumerate(blocks):
            path = tmp_path / f"aggregator{i}.toml"
            path.write_text(block)
            out.append(load_aggregator(path).strategy)
        return out

    documented = strategy_blocks("docs/configuration.md")
    assert [s.name for s in documented] == NAMES
    for s in documented:
        assert s.settings() == STRATEGY_DEFAULTS[s.name]
    [readme] = strategy_blocks("README.md")
    assert readme.settings() == STRATEGY_DEFAULTS["fedadam"]
