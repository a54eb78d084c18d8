"""The fp32 kernels against the numpy references in ``naive``, and the wrappers' argument checks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import kernels
from aggregator.kernels import KERNELS, Buffer, all_finite_fp32, fold_fp32, sq_norm_fp32, warmup
from fedmq.wire import CODECS

import naive

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

# deadline=None: the first example pays for JIT compilation (or a cache load).
SETTINGS = settings(max_examples=60, deadline=None)

FORMS: dict[str, Callable[[F32], Buffer]] = {
    "bytes": lambda x: x.tobytes(),
    "bytearray": lambda x: bytearray(x.tobytes()),
    "memoryview": lambda x: memoryview(x.tobytes()),
    "float32": lambda x: x.copy(),
    "float32-2d": lambda x: x.reshape(1, -1).copy(),
    "float32-readonly": lambda x: np.frombuffer(x.tobytes(), dtype=np.float32),
    "uint8": lambda x: np.frombuffer(x.tobytes(), dtype=np.uint8).copy(),
    # A tensor sliced out of a larger payload at an odd offset.
    "unaligned": lambda x: memoryview(b"\0" + x.tobytes())[1:],
}

weights = st.one_of(st.integers(1, 10**6), st.floats(1e-3, 1e6))


def random_finite(seed: int, size: int) -> F32:
    """Random bit patterns with the all-ones exponent avoided: every finite float32 is possible,
    subnormals and the largest magnitudes included."""
    bits = np.random.default_rng(seed).integers(0, 2**32, size, dtype=np.uint32)
    nonfinite = (bits & 0x7F800000) == 0x7F800000
    bits[nonfinite] &= ~np.uint32(0x00800000)
    return bits.view(np.float32)


@st.composite
def fp32_rounds(draw: st.DrawFn) -> tuple[list[F32], list[float], list[int]]:
    """Updates of one flat tensor, their weights, and an arrival order."""
    size = draw(st.integers(0, 300))
    k = draw(st.integers(1, 6))
    updates = [random_finite(draw(st.integers(0, 2**32 - 1)), size) for _ in range(k)]
    # Mix in small-range updates so cancellation-free cases are well represented too.
    if draw(st.booleans()):
        updates = [u / np.float32(3e38) for u in updates]
    ws = [float(draw(weights)) for _ in range(k)]
    return updates, ws, draw(st.permutations(range(k)))


def scale_of(updates: list[F32]) -> float:
    return max((float(np.max(np.abs(u))) for u in updates if u.size), default=0.0)


@SETTINGS
@given(fp32_rounds(), st.sampled_from(sorted(FORMS)))
def test_folding_one_at_a_time_in_any_order_equals_np_average(
    r: tuple[list[F32], list[float], list[int]], form: str
) -> None:
    updates, ws, order = r
    acc = np.zeros(updates[0].size, dtype=np.float64)
    for i in order:
        fold_fp32(acc, FORMS[form](updates[i]), ws[i])
    expected = naive.weighted_mean(updates, ws)
    # Each add rounds at 2**-53 of the running |sum| <= scale * sum(w): with cancellation the
    # result can be far smaller than its terms, hence an absolute bound on that scale.
    np.testing.assert_allclose(acc / sum(ws), expected, rtol=1e-9, atol=1e-13 * scale_of(updates))


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(0, 300), weights)
def test_fold_is_exactly_acc_plus_w_times_x(seed: int, size: int, w: float) -> None:
    # fastmath=False: no reassociation and no fused multiply-add, so the same bits as numpy.
    x = random_finite(seed, size)
    acc = np.random.default_rng(seed).standard_normal(size) * 1e30
    expected = acc + float(w) * x.astype(np.float64)
    fold_fp32(acc, x.tobytes(), w)
    np.testing.assert_array_equal(acc, expected)


def test_fold_reads_bytes_without_copying_or_modifying_them() -> None:
    data = np.arange(5, dtype=np.float32).tobytes()
    acc = np.zeros(5)
    fold_fp32(acc, data, 2)
    fold_fp32(acc, data, 0.5)
    np.testing.assert_array_equal(acc, 2.5 * np.arange(5))
    assert data == np.arange(5, dtype=np.float32).tobytes()


def test_fold_into_a_slice_of_a_larger_accumulator() -> None:
    acc = np.zeros(10)
    fold_fp32(acc[3:7], np.ones(4, dtype=np.float32), 3.0)
    np.testing.assert_array_equal(acc, [0, 0, 0, 3, 3, 3, 3, 0, 0, 0])


def test_fold_reads_little_endian_bytes() -> None:
    acc = np.zeros(1)
    fold_fp32(acc, b"\x00\x00\x80\x3f", 1.0)  # 1.0f little-endian
    assert acc[0] == 1.0


def _fold_with(
    acc: Any = None, data: Any = None, weight: Any = 1.0
) -> Callable[[], None]:
    acc = np.zeros(4) if acc is None else acc
    data = np.ones(4, dtype=np.float32) if data is None else data
    return lambda: fold_fp32(acc, data, weight)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(_fold_with(acc=np.zeros(4, np.float32)), "acc has dtype <f4", id="acc-f32"),
        pytest.param(_fold_with(acc=np.zeros(4, ">f8")), "acc has dtype >f8", id="acc-bigendian"),
        pytest.param(_fold_with(acc=np.zeros((2, 2))), r"acc must be 1-D; got shape \(2, 2\)",
                     id="acc-2d"),
        pytest.param(_fold_with(acc=np.zeros(8)[::2]), "acc is not contiguous", id="acc-strided"),
        pytest.param(_fold_with(acc=np.frombuffer(bytes(32))), "acc is read-only",
                     id="acc-readonly"),
        pytest.param(_fold_with(data=np.ones(4)), "data has dtype <f8; expected float32",
                     id="data-f64"),
        pytest.param(_fold_with(data=np.ones(4, np.int32)), "data has dtype <i4", id="data-i32"),
        pytest.param(_fold_with(data=np.ones(4, ">f4")), "data has dtype >f4", id="data-bigendian"),
        pytest.param(_fold_with(data=np.ones(8, np.float32)[::2]), "data is not C-contiguous",
                     id="data-strided"),
        pytest.param(_fold_with(data=memoryview(bytes(32))[::2]),
                     "data buffer is not C-contiguous", id="memoryview-strided"),
        pytest.param(_fold_with(data=np.ones(3, np.float32)),
                     "data holds 3 float32 values but acc has 4", id="data-short"),
        pytest.param(_fold_with(data=bytes(20)), "data holds 5 float32 values but acc has 4",
                     id="data-long"),
        pytest.param(_fold_with(data=bytes(15)), "15 bytes, not a whole number", id="bytes-odd"),
        pytest.param(_fold_with(data=np.zeros(15, np.uint8)), "15 bytes, not a whole number",
                     id="uint8-odd"),
        pytest.param(_fold_with(weight=float("nan")), "weight must be finite and >= 0",
                     id="weight-nan"),
        pytest.param(_fold_with(weight=float("inf")), "weight must be finite", id="weight-inf"),
        pytest.param(_fold_with(weight=-1.0), "got -1.0", id="weight-negative"),
    ],
)
def test_fold_rejects_bad_arguments_saying_what_is_wrong(
    call: Callable[[], None], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_fold_rejects_non_buffers_with_type_error() -> None:
    with pytest.raises(TypeError, match="not list"):
        fold_fp32(np.zeros(1), [1.0], 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="acc must be a numpy array"):
        fold_fp32([0.0], bytes(4), 1.0)  # type: ignore[arg-type]


def test_a_rejected_fold_leaves_the_accumulator_unchanged() -> None:
    acc = np.ones(4)
    with pytest.raises(ValueError, match="data holds 3"):
        fold_fp32(acc, bytes(12), 1.0)
    np.testing.assert_array_equal(acc, np.ones(4))


NONFINITE = {
    "nan": np.float32(np.nan),
    "-nan-payload": np.uint32(0xFFC00001).view(np.float32),
    "inf": np.float32(np.inf),
    "-inf": np.float32(-np.inf),
}


@pytest.mark.parametrize("size", [1, 5, 4096, 4097, 10_000])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", sorted(NONFINITE))
def test_all_finite_finds_a_nonfinite_value_anywhere(size: int, where: str, bad: str) -> None:
    x = random_finite(size, size)
    x[{"first": 0, "middle": size // 2, "last": size - 1}[where]] = NONFINITE[bad]
    assert not all_finite_fp32(x.tobytes())
    assert not all_finite_fp32(x)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(0, 9000), st.sampled_from(sorted(FORMS)))
def test_all_finite_agrees_with_numpy(seed: int, size: int, form: str) -> None:
    x = random_finite(seed, size)
    assert all_finite_fp32(FORMS[form](x)) is True
    if size:
        i = seed % size
        x[i] = NONFINITE[sorted(NONFINITE)[seed % len(NONFINITE)]]
        assert all_finite_fp32(FORMS[form](x)) is naive.all_finite(x) is False


def test_all_finite_accepts_extremes_and_empty_input() -> None:
    info = np.finfo(np.float32)
    extremes = np.array([info.max, -info.max, info.tiny, info.smallest_subnormal, -0.0], np.float32)
    assert all_finite_fp32(extremes)
    assert all_finite_fp32(b"")


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(0, 1000), st.sampled_from(sorted(FORMS)))
def test_sq_norm_matches_numpy_in_float64(seed: int, size: int, form: str) -> None:
    x = random_finite(seed, size)
    # float32 max squared is about 1e77: no overflow in float64, which is why it sums there.
    assert sq_norm_fp32(FORMS[form](x)) == pytest.approx(naive.sq_norm(x), rel=1e-12)


def test_sq_norm_small_cases() -> None:
    assert sq_norm_fp32(b"") == 0.0
    assert sq_norm_fp32(np.array([3, 4], np.float32)) == 25.0
    assert sq_norm_fp32(np.array([1e-30], np.float32)) > 0.0  # not flushed to zero


def test_codec_dispatch_table() -> None:
    assert set(KERNELS) <= set(CODECS)
    fp32 = KERNELS["fp32"]
    assert (fp32.fold, fp32.all_finite, fp32.sq_norm) == (fold_fp32, all_finite_fp32,
                                                          sq_norm_fp32)


def test_warmup_compiles_the_only_specialization_each_kernel_needs() -> None:
    warmup()
    warmup()
    acc = np.zeros(3)
    x = np.array([1, 2, 3], np.float32)
    for make in FORMS.values():
        fold_fp32(acc, make(x), 1.0)
        all_finite_fp32(make(x))
        sq_norm_fp32(make(x))
    for k in (kernels._fold_fp32, kernels._all_finite_fp32, kernels._sq_norm_fp32):
        signatures = getattr(k, "signatures", None)
        if signatures is not None:  # None when NUMBA_DISABLE_JIT=1
            assert len(signatures) == 1, signatures


def test_jit_compiles_without_cache_when_no_cache_dir_is_writable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[object] = []

    def fake_njit(**flags: object) -> Callable[[Callable[[int], int]], Callable[[int], int]]:
        calls.append(flags["cache"])
        if flags["cache"]:
            raise RuntimeError("cannot cache function 'f': no locator available for file 'f.py'")
        return lambda fn: fn

    def f(x: int) -> int:
        return x + 1

    monkeypatch.setattr(kernels, "njit", fake_njit)
    assert kernels._jit(f)(1) == 2
    assert calls == [True, False]
