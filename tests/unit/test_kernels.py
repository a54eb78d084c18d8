"""The fp32 kernels against the numpy references in ``naive``, and the wrappers' argument checks.

The other codecs' kernels are tested against the reference decoder in ``test_codecs``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import kernel_batch, kernel_jit, kernel_scans, kernels
from aggregator.kernels import (
    KERNELS,
    Buffer,
    all_finite_fp32,
    check_fp16,
    check_fp32,
    check_int8,
    check_topk,
    fold_fp16,
    fold_fp32,
    fold_int8,
    fold_topk,
    sq_norm_fp16,
    sq_norm_fp32,
    sq_norm_int8,
    sq_norm_topk,
    warmup,
)
from fedmq import codec as wire_codec
from fedmq.compression import encode
from fedmq.wire import CODECS, Blob, ModelUpdate, Tensor

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



def fp32(data: Buffer, size: int | None = None) -> Tensor:
    """An fp32 tensor of shape ``(size,)`` (by default: as many values as ``data`` holds) whose
    ``data`` is any buffer form: wrappers accept them all, not only the ``bytes`` of the wire."""
    n = memoryview(cast(bytes, data)).nbytes // 4 if size is None else size
    return Tensor(name="x", dtype="float32", shape=(n,), codec="fp32", data=cast(bytes, data))


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
        fold_fp32(acc, fp32(FORMS[form](updates[i])), ws[i])
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
    fold_fp32(acc, fp32(x.tobytes()), w)
    np.testing.assert_array_equal(acc, expected)


def test_fold_reads_bytes_without_copying_or_modifying_them() -> None:
    data = np.arange(5, dtype=np.float32).tobytes()
    acc = np.zeros(5)
    fold_fp32(acc, fp32(data), 2)
    fold_fp32(acc, fp32(data), 0.5)
    np.testing.assert_array_equal(acc, 2.5 * np.arange(5))
    assert data == np.arange(5, dtype=np.float32).tobytes()


def test_fold_into_a_slice_of_a_larger_accumulator() -> None:
    acc = np.zeros(10)
    fold_fp32(acc[3:7], fp32(np.ones(4, dtype=np.float32)), 3.0)
    np.testing.assert_array_equal(acc, [0, 0, 0, 3, 3, 3, 3, 0, 0, 0])


def test_fold_reads_little_endian_bytes() -> None:
    acc = np.zeros(1)
    fold_fp32(acc, fp32(b"\x00\x00\x80\x3f"), 1.0)  # 1.0f little-endian
    assert acc[0] == 1.0


def _fold_with(
    acc: Any = None, data: Any = None, weight: Any = 1.0, **fields: Any
) -> Callable[[], None]:
    acc = np.zeros(4) if acc is None else acc
    data = np.ones(4, dtype=np.float32) if data is None else data
    t = dataclasses.replace(fp32(data, 4), **fields)
    return lambda: fold_fp32(acc, t, weight)


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
                     "data holds 3 float32 values; expected 4", id="data-short"),
        pytest.param(_fold_with(data=bytes(20)), "data holds 5 float32 values; expected 4",
                     id="data-long"),
        pytest.param(_fold_with(acc=np.zeros(5)), r"acc has 5 elements; tensor 'x' covers 4",
                     id="acc-long"),
        pytest.param(_fold_with(acc=np.zeros(8)[4:6], data=bytes(12), shape=(8,), offset=4,
                                count=3),
                     r"acc has 2 elements; tensor 'x' covers 3 \(\[4, 7\)\)", id="acc-range"),
        pytest.param(_fold_with(offset=2, count=3), r"range \[2, 5\) is outside its 4",
                     id="range-outside"),
        pytest.param(_fold_with(codec="fp16"), "has codec 'fp16'; this is the fp32 kernel",
                     id="wrong-codec"),
        pytest.param(_fold_with(dtype="float16"), "has dtype 'float16'; expected 'float32'",
                     id="wrong-dtype"),
        pytest.param(_fold_with(block=4, scales=bytes(4)), "block and scales are only for int8",
                     id="fp32-with-scales"),
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
        fold_fp32(np.zeros(1), fp32(cast(Buffer, [1.0]), 1), 1.0)
    with pytest.raises(TypeError, match="acc must be a numpy array"):
        fold_fp32([0.0], fp32(bytes(4)), 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"expected a fedmq\.wire\.Tensor, not bytes"):
        fold_fp32(np.zeros(1), bytes(4), 1.0)  # type: ignore[arg-type]


def test_a_rejected_fold_leaves_the_accumulator_unchanged() -> None:
    acc = np.ones(4)
    with pytest.raises(ValueError, match="data holds 3"):
        fold_fp32(acc, fp32(bytes(12), 4), 1.0)
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
    assert not check_fp32(fp32(x.tobytes()))


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(0, 9000), st.sampled_from(sorted(FORMS)))
def test_all_finite_agrees_with_numpy(seed: int, size: int, form: str) -> None:
    x = random_finite(seed, size)
    assert all_finite_fp32(FORMS[form](x)) is True
    assert check_fp32(fp32(FORMS[form](x))) is True
    if size:
        i = seed % size
        x[i] = NONFINITE[sorted(NONFINITE)[seed % len(NONFINITE)]]
        assert all_finite_fp32(FORMS[form](x)) is naive.all_finite(x) is False
        assert check_fp32(fp32(FORMS[form](x))) is False


def test_all_finite_accepts_extremes_and_empty_input() -> None:
    info = np.finfo(np.float32)
    extremes = np.array([info.max, -info.max, info.tiny, info.smallest_subnormal, -0.0], np.float32)
    assert all_finite_fp32(extremes)
    assert all_finite_fp32(b"")
    assert check_fp32(fp32(extremes.tobytes()))
    assert check_fp32(fp32(b""))


def test_check_is_false_for_a_malformed_tensor_and_raises_only_for_a_wrong_codec() -> None:
    assert not check_fp32(fp32(bytes(12), 4))  # too short
    assert not check_fp32(dataclasses.replace(fp32(bytes(16)), offset=1))  # range outside
    with pytest.raises(ValueError, match="has codec 'int8'; this is the fp32 kernel"):
        check_fp32(dataclasses.replace(fp32(bytes(16)), codec="int8"))


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(0, 1000), st.sampled_from(sorted(FORMS)))
def test_sq_norm_matches_numpy_in_float64(seed: int, size: int, form: str) -> None:
    x = random_finite(seed, size)
    # float32 max squared is about 1e77: no overflow in float64, which is why it sums there.
    assert sq_norm_fp32(fp32(FORMS[form](x))) == pytest.approx(naive.sq_norm(x), rel=1e-12)


def test_sq_norm_small_cases() -> None:
    assert sq_norm_fp32(fp32(b"")) == 0.0
    assert sq_norm_fp32(fp32(np.array([3, 4], np.float32))) == 25.0
    assert sq_norm_fp32(fp32(np.array([1e-30], np.float32))) > 0.0  # not flushed to zero


def test_codec_dispatch_table() -> None:
    assert set(KERNELS) == set(CODECS)
    expected = {
        "fp32": (fold_fp32, check_fp32, sq_norm_fp32),
        "fp16": (fold_fp16, check_fp16, sq_norm_fp16),
        "int8": (fold_int8, check_int8, sq_norm_int8),
        "topk": (fold_topk, check_topk, sq_norm_topk),
    }
    for codec, (fold, check, sq_norm) in expected.items():
        k = KERNELS[codec]
        assert (k.fold, k.check, k.sq_norm) == (fold, check, sq_norm)


PRIVATE_KERNELS = (
    kernel_jit._first_bad_index,
    kernel_batch._fold_fp32, kernel_batch._fold_fp16, kernel_batch._fold_int8,
    kernels._fold_topk_int8, kernels._fold_topk_fp16,
    kernel_scans._all_finite_fp32, kernel_scans._all_finite_fp16, kernel_scans._all_finite_int8,
    kernel_scans._sq_norm_fp32, kernel_scans._sq_norm_fp16, kernel_scans._sq_norm_int8,
    kernel_batch._fold_fp32_2, kernel_batch._fold_fp32_4, kernel_batch._fold_fp16_2,
    kernel_batch._fold_fp16_4, kernel_batch._fold_int8_2, kernel_batch._fold_int8_4,
)


def test_warmup_compiles_the_only_specialization_each_kernel_needs() -> None:
    warmup()
    warmup()
    for k in PRIVATE_KERNELS:  # warmup itself reached every kernel
        assert getattr(k, "signatures", [None]), k
    acc = np.zeros(3)
    x = np.array([1, 2, 3], np.float32)
    for make in FORMS.values():
        fold_fp32(acc, fp32(make(x)), 1.0)
        all_finite_fp32(make(x))
        check_fp32(fp32(make(x)))
        sq_norm_fp32(fp32(make(x)))
    byte_forms: list[Callable[[Blob], Buffer]] = [
        bytearray, lambda b: memoryview(b"\0" + b)[1:], lambda b: np.frombuffer(b, np.uint8).copy()]
    for codec, values in [("fp16", "int8"), ("int8", "int8"), ("topk", "int8"), ("topk", "fp16")]:
        t = encode("x", x, codec, block=2, fraction=0.5, values=values)
        for form in byte_forms:
            u = dataclasses.replace(t, data=cast(bytes, form(t.data)),
                                    scales=cast(bytes, form(t.scales)),
                                    indices=cast(bytes, form(t.indices)))
            KERNELS[codec].fold(acc, u, 1.0)
            KERNELS[codec].check(u)
            KERNELS[codec].sq_norm(u)
    # Batches (grouped kernels), in every byte form and as decoded (views into a payload).
    big = np.linspace(-1.0, 1.0, 20_000, dtype=np.float32)  # large enough to decode as views
    for codec in ("fp32", "fp16", "int8"):
        t = encode("x", big, codec, block=2)
        payload = wire_codec.encode(ModelUpdate(federation="f", device_id="d", round=1,
                                                base_version=0, update_id="u", num_examples=1,
                                                tensors=(t,)))
        decoded = wire_codec.decode(payload)
        assert isinstance(decoded, ModelUpdate)
        batch = [(dataclasses.replace(t, data=cast(bytes, form(t.data)),
                                      scales=cast(bytes, form(t.scales))), 1.0)
                 for form in byte_forms] + [(decoded.tensors[0], 1.0)] * 4
        assert isinstance(decoded.tensors[0].data, memoryview)
        kernels.fold_many(np.zeros(big.size), batch)
    for k in PRIVATE_KERNELS:
        signatures = getattr(k, "signatures", None)
        if signatures is not None:  # None when NUMBA_DISABLE_JIT=1
            assert len(signatures) == 1, (k, signatures)
    # Called only from other kernels: compiled for one type, or (loaded from the cache) none.
    assert len(getattr(kernel_jit._half, "signatures", None) or []) <= 1


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

    monkeypatch.setattr(kernel_jit, "njit", fake_njit)
    assert kernel_jit._jit(f)(1) == 2
    assert calls == [True, False]
