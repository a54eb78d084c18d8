"""ModelSpec, PartialSum and FedAvg against the numpy references in ``naive``."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aggregator.spec import ModelSpec
from aggregator.strategies import FedAvg, PartialSum, Strategy
from fedmq.compression import encode, encode_all
from fedmq.errors import ProtocolError
from fedmq.wire import Tensor

import naive

F32 = npt.NDArray[np.float32]
Weights = dict[str, F32]

SETTINGS = settings(max_examples=50, deadline=None)


@dataclasses.dataclass
class Round:
    """A base model, the updates (deltas) of one round, their weights and an arrival order."""

    base: Weights
    updates: list[Weights]
    weights: list[float]
    order: list[int]

    @property
    def scale(self) -> float:
        """Largest magnitude among all values: the yardstick for absolute rounding error."""
        arrays = [*self.base.values(), *(a for u in self.updates for a in u.values())]
        return max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)


@st.composite
def rounds(draw: st.DrawFn, magnitude: float = 1e30) -> Round:
    names = draw(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=4, unique=True))
    # min_dims=1: fedmq.compression.encode turns a 0-d array into shape (1,) (ascontiguousarray).
    shapes = [draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5))
              for _ in names]
    # Magnitudes from subnormal to ``magnitude``, signs mixed.
    m = float(np.float32(magnitude))
    elements = st.floats(-m, m, width=32)
    k = draw(st.integers(1, 6))

    def model() -> Weights:
        return {n: draw(hnp.arrays(np.float32, s, elements=elements))
                for n, s in zip(names, shapes, strict=True)}

    base = model()
    updates = [model() for _ in range(k)]
    ws = [float(draw(st.one_of(st.integers(1, 10**6), st.floats(1e-3, 1e6)))) for _ in range(k)]
    return Round(base, updates, ws, draw(st.permutations(range(k))))


def shuffled(tensors: Sequence[Tensor], seed: int) -> list[Tensor]:
    """The same tensors in another order: updates need not follow the spec's order."""
    return [tensors[i] for i in np.random.default_rng(seed).permutation(len(tensors))]


def folded(r: Round, which: Sequence[int], server_lr: float = 1.0) -> FedAvg:
    s = FedAvg(ModelSpec.from_weights(r.base), server_lr)
    s.init(r.base)
    for i in which:
        s.fold(shuffled(encode_all(r.updates[i]), i), r.weights[i])
    return s


def assert_model_close(got: Mapping[str, F32], expected: Mapping[str, npt.NDArray[np.float64]],
                       scale: float) -> None:
    """float32 ``got`` is ``expected`` rounded once (half an ulp) up to float64 noise."""
    assert list(got) == list(expected)
    for name, e in expected.items():
        assert got[name].dtype == np.float32
        assert got[name].shape == e.shape
        np.testing.assert_allclose(got[name], e, rtol=2**-23, atol=1e-12 * scale + 1e-45)


# ---------------------------------------------------------------- FedAvg vs np.average


@SETTINGS
@given(rounds(magnitude=3e38))
def test_mean_delta_in_any_arrival_order_equals_np_average(r: Round) -> None:
    s = folded(r, r.order)
    spec = s.spec
    expected = np.concatenate(
        [naive.weighted_mean([u[n].reshape(-1) for u in r.updates], r.weights)
         for n in spec.names]
    )
    np.testing.assert_allclose(s.mean_delta(), expected, rtol=1e-9, atol=1e-13 * r.scale)
    assert s.contributors == len(r.updates)
    assert s.total_weight == pytest.approx(sum(r.weights), rel=1e-15)


@SETTINGS
@given(rounds(), st.sampled_from([1.0, 0.5, 1.7]))
def test_finalize_equals_base_plus_np_average(r: Round, server_lr: float) -> None:
    s = folded(r, r.order, server_lr)
    expected = naive.fedavg(r.base, r.updates, r.weights, server_lr)
    assert_model_close(s.finalize(), expected, r.scale)


@SETTINGS
@given(rounds(), st.data())
def test_partial_sums_merge_associatively_and_equal_one_fold(r: Round, data: st.DataObject) -> None:
    group = [data.draw(st.integers(0, 2)) for _ in r.updates]
    a, b, c = (folded(r, [i for i in r.order if group[i] == g]).partial() for g in range(3))
    left, right = a.merge(b).merge(c), a.merge(b.merge(c))
    whole = folded(r, r.order).partial()
    atol = 1e-15 * r.scale * sum(r.weights)
    for p in (left, right, c.merge(a).merge(b)):
        np.testing.assert_allclose(p.weighted_sum, whole.weighted_sum, rtol=1e-12, atol=atol)
        assert p.total_weight == pytest.approx(whole.total_weight, rel=1e-15)
        assert p.contributors == whole.contributors == len(r.updates)
    # Merging into a strategy, e.g. a coordinator fed by workers, finalizes to the same model.
    coordinator = FedAvg(ModelSpec.from_weights(r.base))
    coordinator.init(r.base)
    coordinator.merge(left)
    assert_model_close(coordinator.finalize(), naive.fedavg(r.base, r.updates, r.weights),
                       r.scale)


def test_zero_is_the_identity_of_merge() -> None:
    p = PartialSum(np.array([1.5, -0.0, 3.0]), 2.0, 1)
    for q in (p.merge(PartialSum.zero(3)), PartialSum.zero(3).merge(p)):
        np.testing.assert_array_equal(q.weighted_sum, p.weighted_sum)
        assert (q.total_weight, q.contributors) == (2.0, 1)


def test_merge_leaves_its_inputs_unchanged_and_checks_sizes() -> None:
    p, q = PartialSum(np.ones(2), 1.0, 1), PartialSum(np.ones(2), 2.0, 3)
    m = p.merge(q)
    np.testing.assert_array_equal(m.weighted_sum, [2.0, 2.0])
    np.testing.assert_array_equal(p.weighted_sum, [1.0, 1.0])
    with pytest.raises(ValueError, match="cannot merge partial sums of 2 and 3 parameters"):
        p.merge(PartialSum.zero(3))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((np.ones(2, np.float32), 1.0, 1), "1-D float64"),
        ((np.ones((1, 2)), 1.0, 1), "1-D float64"),
        ((np.ones(2), -1.0, 1), "total_weight must be finite and >= 0"),
        ((np.ones(2), math.nan, 1), "total_weight must be finite"),
        ((np.ones(2), 1.0, -1), "contributors must be >= 0"),
    ],
)
def test_partial_sum_validates_its_fields(args: tuple[npt.NDArray[np.generic], float, int],
                                          message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PartialSum(*args)  # type: ignore[arg-type]


# ---------------------------------------------------------------- FedAvg state and errors


BASE: Weights = {"w": np.array([[1, 2], [3, 4]], np.float32), "b": np.array([0.5], np.float32)}


def update(w: float, b: float) -> tuple[Tensor, ...]:
    return (encode("w", np.full((2, 2), w)), encode("b", [b]))


def started(server_lr: float = 1.0) -> FedAvg:
    s = FedAvg(ModelSpec.from_weights(BASE), server_lr)
    s.init(BASE)
    return s


def test_fedavg_worked_example_weighted_by_num_examples() -> None:
    s = started(server_lr=0.5)
    s.fold(update(1.0, 10.0), 30)
    s.fold(update(-1.0, 2.0), 10)
    assert (s.contributors, s.total_weight) == (2, 40.0)
    np.testing.assert_array_equal(s.mean_delta(), [0.5] * 4 + [8.0])
    new = s.finalize()
    assert list(new) == ["w", "b"]
    np.testing.assert_array_equal(new["w"], BASE["w"] + 0.25)
    np.testing.assert_array_equal(new["b"], [4.5])


def test_fedavg_satisfies_the_strategy_protocol() -> None:
    s: Strategy = started()
    s.fold(update(1.0, 1.0), 1)
    assert s.contributors == 1


@pytest.mark.parametrize("call", ["fold", "mean_delta", "finalize", "partial", "merge"])
def test_anything_before_init_is_a_protocol_error(call: str) -> None:
    s = FedAvg(ModelSpec.from_weights(BASE))
    actions: dict[str, Callable[[], object]] = {
        "fold": lambda: s.fold(update(1, 1), 1),
        "mean_delta": s.mean_delta,
        "finalize": s.finalize,
        "partial": s.partial,
        "merge": lambda: s.merge(PartialSum.zero(5)),
    }
    with pytest.raises(ProtocolError, match=f"{call} before init"):
        actions[call]()


@pytest.mark.parametrize("call", ["mean_delta", "finalize"])
def test_averaging_zero_updates_is_a_protocol_error(call: str) -> None:
    s = started()
    with pytest.raises(ProtocolError, match="no updates in this round"):
        getattr(s, call)()


@pytest.mark.parametrize("weight", [0, -1, -0.5, math.nan, math.inf, -math.inf])
def test_fold_rejects_weights_that_are_not_finite_and_positive(weight: float) -> None:
    s = started()
    with pytest.raises(ValueError, match="weight must be finite and > 0"):
        s.fold(update(1, 1), weight)
    assert (s.contributors, s.total_weight) == (0, 0.0)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ((encode("w", np.ones((2, 2))),), "missing tensor 'b'"),
        ((*update(1, 1), encode("x", [1.0])), "unexpected tensor 'x'"),
        ((encode("w", np.ones((2, 2))), encode("b", [9.0]), encode("b", [9.0])),
         "tensor 'b' appears more than once"),
        ((encode("w", np.ones((2, 2))), encode("b", [9.0, 9.0])),
         r"tensor 'b' has shape \(2,\); the model has \(1,\)"),
    ],
    ids=["missing", "extra", "duplicate", "wrong-shape"],
)
def test_a_mismatching_update_is_rejected_whole(tensors: tuple[Tensor, ...], message: str) -> None:
    s = started()
    s.fold(update(1, 1), 1)
    before = s.partial()
    with pytest.raises(ValueError, match=f"update does not match the model: {message}"):
        s.fold(tensors, 1)
    after = s.partial()
    np.testing.assert_array_equal(after.weighted_sum, before.weighted_sum)
    assert (after.total_weight, after.contributors) == (before.total_weight, before.contributors)


def test_init_starts_a_new_round_on_the_same_accumulator() -> None:
    s = started()
    s.fold(update(5, 5), 3)
    acc = s._acc
    s.init(BASE)
    assert (s.contributors, s.total_weight) == (0, 0.0)
    assert s._acc is acc
    np.testing.assert_array_equal(s.partial().weighted_sum, np.zeros(5))
    s.fold(update(1, 1), 1)
    np.testing.assert_array_equal(s.finalize()["b"], [1.5])


def test_init_copies_the_base() -> None:
    base = {k: v.copy() for k, v in BASE.items()}
    s = FedAvg(ModelSpec.from_weights(base))
    s.init(base)
    base["b"][0] = 100.0
    s.fold(update(0, 0), 1)
    np.testing.assert_array_equal(s.finalize()["b"], [0.5])


def test_partial_is_a_snapshot_not_a_view() -> None:
    s = started()
    s.fold(update(1, 1), 2)
    p = s.partial()
    p.weighted_sum[:] = 0
    s.fold(update(1, 1), 2)
    np.testing.assert_array_equal(s.mean_delta(), np.ones(5))


@pytest.mark.parametrize(
    ("base", "message"),
    [
        ({"w": BASE["w"]}, r"missing \['b'\]"),
        ({**BASE, "x": BASE["b"]}, r"extra \['x'\]"),
        ({**BASE, "b": np.zeros(2, np.float32)},
         r"'b' is float32 \(2,\); expected float32 \(1,\)"),
        ({**BASE, "b": np.zeros(1)}, "'b' is float64 \\(1,\\); expected float32"),
        ({**BASE, "b": np.array([np.inf], np.float32)}, "NaN or inf"),
    ],
    ids=["missing", "extra", "shape", "dtype", "inf"],
)
def test_init_rejects_a_base_that_does_not_match(base: Weights, message: str) -> None:
    s = FedAvg(ModelSpec.from_weights(BASE))
    with pytest.raises(ValueError, match=message):
        s.init(base)


@pytest.mark.parametrize("lr", [0.0, -1.0, math.nan, math.inf])
def test_server_lr_must_be_finite_and_positive(lr: float) -> None:
    with pytest.raises(ValueError, match="server_lr must be finite and > 0"):
        FedAvg(ModelSpec.from_weights(BASE), lr)


def test_finalize_refuses_a_model_that_overflows_float32() -> None:
    big = np.finfo(np.float32).max
    s = started()
    s.fold((encode("w", np.full((2, 2), big)), encode("b", [big])), 1)
    s.init({"w": np.full((2, 2), big, np.float32), "b": np.array([big], np.float32)})
    s.fold((encode("w", np.full((2, 2), big)), encode("b", [big])), 1)
    with pytest.raises(FloatingPointError, match="float32 overflow"):
        s.finalize()


def test_merge_checks_the_size_and_adds_counts() -> None:
    s = started()
    with pytest.raises(ValueError, match="partial sum has 3 parameters; the model has 5"):
        s.merge(PartialSum.zero(3))
    s.merge(PartialSum(np.full(5, 6.0), 3.0, 2))
    assert (s.contributors, s.total_weight) == (2, 3.0)
    np.testing.assert_array_equal(s.mean_delta(), np.full(5, 2.0))


# ---------------------------------------------------------------- ModelSpec


def test_spec_layout_from_weights_and_from_tensors_agree() -> None:
    spec = ModelSpec.from_weights(BASE)
    assert spec == ModelSpec.from_tensors(encode_all(BASE))
    assert (spec.names, spec.shapes, spec.offsets, spec.total) == (
        ("w", "b"), ((2, 2), (1,)), (0, 4), 5)
    assert spec.sizes == (4, 1)
    assert spec.slices() == {"w": slice(0, 4), "b": slice(4, 5)}
    assert spec.index("b") == 1
    flat = np.arange(5.0)
    parts = spec.split(flat)
    np.testing.assert_array_equal(parts["w"], [[0, 1], [2, 3]])
    assert parts["b"].base is flat  # views, not copies
    with pytest.raises(ValueError, match=r"flat vector has shape \(4,\); expected \(5,\)"):
        spec.split(np.zeros(4))


def test_spec_with_scalar_and_empty_tensors() -> None:
    spec = ModelSpec.from_weights({"s": np.float32(1.0) * np.ones(()), "e": np.zeros((0, 3))})
    assert (spec.shapes, spec.offsets, spec.total) == (((), (0, 3)), (0, 1), 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"names": (), "shapes": (), "offsets": (), "total": 0}, "at least one tensor"),
        ({"names": ("a", "a"), "shapes": ((1,), (1,)), "offsets": (0, 1), "total": 2},
         "'a' appears more than once"),
        ({"names": ("a",), "shapes": ((-1,),), "offsets": (0,), "total": 0}, "negative dimension"),
        ({"names": ("a", "b"), "shapes": ((2,), (1,)), "offsets": (0, 1), "total": 3},
         "'b' has offset 1; expected 2"),
        ({"names": ("a",), "shapes": ((2,),), "offsets": (0,), "total": 3},
         "total is 3; the shapes add up to 2"),
        ({"names": ("a",), "shapes": ((2,), (1,)), "offsets": (0,), "total": 2}, "same length"),
    ],
)
def test_spec_rejects_an_inconsistent_layout(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelSpec(**kwargs)  # type: ignore[arg-type]


def test_spec_from_tensors_rejects_duplicate_names() -> None:
    with pytest.raises(ValueError, match="'w' appears more than once"):
        ModelSpec.from_tensors([encode("w", [1.0]), encode("w", [1.0])])


def test_spec_check_accepts_an_exact_match_in_any_order() -> None:
    spec = ModelSpec.from_weights(BASE)
    assert spec.check(update(1, 1)) is None
    assert spec.check(update(1, 1)[::-1]) is None


def _retype(t: Tensor, **changes: object) -> Tensor:
    return dataclasses.replace(t, **changes)  # type: ignore[arg-type]


W, B = update(1, 1)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ((W,), "missing tensor 'b'"),
        ((), "missing tensors 'w', 'b'"),
        ((W, B, encode("x", [1.0])), "unexpected tensor 'x'"),
        ((W, B, B), "tensor 'b' appears more than once"),
        ((W, encode("b", [[1.0]])), r"tensor 'b' has shape \(1, 1\); the model has \(1,\)"),
        ((W, _retype(B, dtype="float16")), "tensor 'b' has dtype 'float16'; expected 'float32'"),
        ((W, _retype(B, codec="bogus")),
         "tensor 'b' uses codec 'bogus'; allowed: fp16, fp32, int8, topk"),
        ((W, _retype(B, count=0)), r"tensor 'b' covers elements \[0, 0\) of 1"),
    ],
    ids=["missing", "empty", "extra", "duplicate", "shape", "dtype", "codec", "partial-range"],
)
def test_spec_check_explains_a_mismatch(tensors: tuple[Tensor, ...], message: str) -> None:
    reason = ModelSpec.from_weights(BASE).check(tensors)
    assert reason is not None
    assert re.fullmatch(message, reason), reason


def test_spec_check_limits_codecs_to_the_allowed_set() -> None:
    spec = ModelSpec.from_weights(BASE)
    assert spec.check(update(1, 1), codecs=("int8",)) == (
        "tensor 'w' uses codec 'fp32'; allowed: int8")


def test_spec_check_names_at_most_three_missing_tensors() -> None:
    spec = ModelSpec.from_weights({n: np.zeros(1, np.float32) for n in "abcde"})
    assert spec.check([]) == "missing tensors 'a', 'b', 'c' and 2 more"
