"""Codecs: encoders against the reference decoder, each fused kernel against the reference fold
``acc + w * decode_range(t)``, the checks and norms, and device-side error feedback.

The fp32 kernels' argument checks are in ``test_kernels``; this file covers what every codec adds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aggregator import kernel_jit
from aggregator.kernels import KERNELS, fold_int8, fold_topk
from aggregator.spec import ModelSpec
from aggregator.strategies import FedAvg
from fedmq import codec as wire_codec
from fedmq.compression import (
    FP16_MAX,
    ErrorFeedback,
    decode,
    decode_all,
    decode_range,
    encode,
    encode_all,
    encode_with_feedback,
    quantize,
)
from fedmq.wire import CODECS, Blob, ModelUpdate, Tensor, blocks

import naive

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]

# deadline=None: the first example pays for JIT compilation (or a cache load).
SETTINGS = settings(max_examples=100, deadline=None)

FLT_MAX = float(np.finfo(np.float32).max)
TINY = float(np.finfo(np.float32).smallest_subnormal)
# A subnormal scale is itself rounded to a multiple of TINY, off by up to TINY / 2, and |q| <= 127
# multiplies that: the int8 error bound needs this much slack for tiny values.
SCALE_SLACK = 127 * TINY


def random_finite(seed: int, size: int, kind: str = "bits") -> F32:
    """``bits``: any finite float32 (subnormals to ±FLT_MAX); ``normal``: N(0, 1); ``small``:
    N(0, 1e-3) with exact zeros mixed in, like a sparse model delta."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.standard_normal(size).astype(np.float32)
    if kind == "small":
        x = (rng.standard_normal(size) * 1e-3).astype(np.float32)
        x[rng.random(size) < 0.3] = 0.0
        return x
    bits = rng.integers(0, 2**32, size, dtype=np.uint32)
    nonfinite = (bits & 0x7F800000) == 0x7F800000
    bits[nonfinite] &= ~np.uint32(0x00800000)
    return bits.view(np.float32)


@dataclasses.dataclass
class Options:
    """The encoder options of one codec choice."""

    codec: str
    block: int = 256
    fraction: float = 0.01
    values: str = "int8"

    def encode(self, name: str, x: npt.ArrayLike, offset: int = 0,
               count: int | None = None) -> Tensor:
        return encode(name, x, self.codec, block=self.block, fraction=self.fraction,
                      values=self.values, offset=offset, count=count)


@st.composite
def options(draw: st.DrawFn, codec: str | None = None) -> Options:
    c = codec if codec is not None else draw(st.sampled_from(CODECS))
    return Options(c, block=draw(st.integers(1, 70)), fraction=draw(st.floats(0.001, 1.0)),
                   values=draw(st.sampled_from(["int8", "fp16"])))


@dataclasses.dataclass
class Case:
    """Several updates of one tensor, each a random range of it, with weights and an order."""

    shape: tuple[int, ...]
    tensors: list[Tensor]
    weights: list[float]
    order: list[int]
    acc: F64

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@st.composite
def cases(draw: st.DrawFn, codec: str | None = None) -> Case:
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=9))
    size = math.prod(shape)
    k = draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["bits", "normal", "small"]))
    tensors = []
    for _ in range(k):
        opts = draw(options(codec))
        offset = draw(st.integers(0, size))
        count = draw(st.one_of(st.none(), st.integers(0, size - offset)))
        x = random_finite(draw(st.integers(0, 2**32 - 1)), size, kind).reshape(shape)
        tensors.append(opts.encode("t", x, offset, count))
    ws = [float(draw(st.one_of(st.integers(1, 10**6), st.floats(1e-3, 1e6)))) for _ in range(k)]
    seed = draw(st.integers(0, 2**32 - 1))
    acc = np.random.default_rng(seed).standard_normal(size) * draw(st.sampled_from([0.0, 1e3]))
    return Case(shape, tensors, ws, draw(st.permutations(range(k))), acc)


def reference_fold(acc: F64, t: Tensor, w: float) -> None:
    """The slow obvious fold: decode the range to float32, then ``acc + w * float64(x)``."""
    seg = acc[t.offset:t.offset + t.span]
    seg[:] = seg + w * decode_range(t).astype(np.float64)


def fold(acc: F64, t: Tensor, w: float) -> None:
    KERNELS[t.codec].fold(acc[t.offset:t.offset + t.span], t, w)


# ---------------------------------------------------------------- fused fold == reference


@SETTINGS
@given(cases())
def test_each_fused_fold_equals_its_numpy_reference_bit_for_bit(c: Case) -> None:
    # fastmath is off: per element the kernel computes exactly acc + w * float64(value).
    ours, ref = c.acc.copy(), c.acc.copy()
    for i in c.order:
        fold(ours, c.tensors[i], c.weights[i])
        reference_fold(ref, c.tensors[i], c.weights[i])
    np.testing.assert_array_equal(ours, ref)


@SETTINGS
@given(cases())
def test_folding_in_any_order_equals_the_weighted_sum_of_decoded_updates(c: Case) -> None:
    acc = np.zeros(c.size)
    for i in c.order:
        fold(acc, c.tensors[i], c.weights[i])
    dense = []
    for t in c.tensors:
        d = np.zeros(c.size, dtype=np.float32)
        d[t.offset:t.offset + t.span] = decode_range(t)
        dense.append(d)
    expected = naive.weighted_mean(dense, c.weights) * sum(c.weights)
    scale = max((float(np.max(np.abs(d))) for d in dense if d.size), default=0.0)
    np.testing.assert_allclose(acc, expected, rtol=1e-9, atol=1e-13 * scale * sum(c.weights))


BYTE_FORMS: dict[str, Callable[[Blob], Any]] = {
    "bytearray": bytearray,
    "memoryview": memoryview,
    "unaligned": lambda b: memoryview(b"\0" + b)[1:],
    "uint8": lambda b: np.frombuffer(b, np.uint8).copy(),
    "uint8-readonly": lambda b: np.frombuffer(b, np.uint8),
}


@SETTINGS
@given(cases(), st.sampled_from(sorted(BYTE_FORMS)))
def test_fold_reads_any_buffer_form_the_same(c: Case, form: str) -> None:
    make = BYTE_FORMS[form]
    for t in c.tensors:
        u = dataclasses.replace(t, data=make(t.data), scales=make(t.scales),
                                indices=make(t.indices))
        a, b = c.acc.copy(), c.acc.copy()
        fold(a, t, 2.5)
        fold(b, u, 2.5)
        np.testing.assert_array_equal(a, b)
        assert KERNELS[t.codec].check(u) is KERNELS[t.codec].check(t)
        assert KERNELS[t.codec].sq_norm(u) == KERNELS[t.codec].sq_norm(t)


def test_topk_fold_touches_only_its_k_positions() -> None:
    x = np.zeros(1000, np.float32)
    x[[3, 500, 999]] = [5.0, -7.0, 6.0]
    for values in ("int8", "fp16"):
        t = encode("t", x, "topk", fraction=0.003, values=values, block=1)  # exact values
        assert t.nnz == 3
        acc = np.full(1000, np.nan)  # anything read-modify-written elsewhere would show
        acc[[3, 500, 999]] = 0.0
        fold_topk(acc, t, 2.0)
        np.testing.assert_array_equal(acc[[3, 500, 999]], [10.0, -14.0, 12.0])
        assert np.isnan(np.delete(acc, [3, 500, 999])).all()


def test_fp16_kernels_are_exact_for_every_bit_pattern() -> None:
    bits = np.arange(1 << 16, dtype=np.uint16)
    t = Tensor("h", "float32", (bits.size,), "fp16", bits.astype("<u2").tobytes())
    with np.errstate(invalid="ignore"):
        expected = bits.view(np.float16).astype(np.float32).astype(np.float64)
    acc = np.full(bits.size, -0.0)  # -0.0 + x is x, the sign of zero included
    KERNELS["fp16"].fold(acc, t, 1.0)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(acc), nan)
    np.testing.assert_array_equal(acc[~nan], expected[~nan])
    np.testing.assert_array_equal(np.signbit(acc[~nan]), np.signbit(expected[~nan]))
    np.testing.assert_array_equal(decode_range(t)[~nan], expected[~nan])
    # Each single pattern through the norm as well (finite ones: NaN/inf make the norm non-finite).
    finite = bits[~np.isinf(expected) & ~nan]
    sq = KERNELS["fp16"].sq_norm(dataclasses.replace(t, shape=(finite.size,),
                                                     data=finite.astype("<u2").tobytes()))
    assert sq == pytest.approx(float(np.sum(expected[finite] ** 2)), rel=1e-12)


def test_the_integer_fp16_conversion_is_exact_for_every_bit_pattern() -> None:
    # The kernels use the hardware conversion where the CPU has one (the test above covers
    # whichever is in use); this is the fallback, compiled on its own.
    bits = np.arange(1 << 16, dtype=np.uint16)
    with np.errstate(invalid="ignore"):
        expected = bits.view(np.float16).astype(np.float64)
    got = np.array([kernel_jit._half_sw(b) for b in bits])
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan], expected[~nan])
    np.testing.assert_array_equal(np.signbit(got[~nan]), np.signbit(expected[~nan]))


def test_int8_value_minus_128_decodes_like_the_reference() -> None:
    # The encoder never writes -128, but it is a valid int8 and must decode the same everywhere.
    t = Tensor("q", "float32", (3,), "int8", np.array([-128, 127, 1], np.int8).tobytes(),
               block=2, scales=np.array([0.5, 3.0], "<f4").tobytes())
    acc = np.zeros(3)
    fold_int8(acc, t, 1.0)
    np.testing.assert_array_equal(acc, [-64.0, 63.5, 3.0])
    np.testing.assert_array_equal(decode_range(t), [-64.0, 63.5, 3.0])


# ---------------------------------------------------------------- check and sq_norm


@SETTINGS
@given(cases())
def test_check_accepts_every_encoding_of_finite_values(c: Case) -> None:
    for t in c.tensors:
        assert KERNELS[t.codec].check(t) is True


@SETTINGS
@given(cases())
def test_sq_norm_equals_numpy_on_the_decoded_values(c: Case) -> None:
    for t in c.tensors:
        expected = naive.sq_norm(decode_range(t))
        assert KERNELS[t.codec].sq_norm(t) == pytest.approx(expected, rel=1e-12, abs=1e-300)


def _with_bits(t: Tensor, position: int, bits: int) -> Tensor:
    """``t`` with the fp16 value at ``position`` replaced by ``bits``."""
    h = np.frombuffer(t.data, "<u2").copy()
    h[position] = bits
    return dataclasses.replace(t, data=h.tobytes())


FP16_NONFINITE = {"inf": 0x7C00, "-inf": 0xFC00, "nan": 0x7E00, "-nan-payload": 0xFC01}


@pytest.mark.parametrize("size", [1, 5, 4096, 4097, 10_000])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("bad", sorted(FP16_NONFINITE))
def test_check_finds_nonfinite_fp16_anywhere(size: int, where: str, bad: str) -> None:
    pos = {"first": 0, "middle": size // 2, "last": size - 1}[where]
    x = random_finite(size, size, "normal")
    t = encode("t", x, "fp16")
    assert KERNELS["fp16"].check(t)
    assert not KERNELS["fp16"].check(_with_bits(t, pos, FP16_NONFINITE[bad]))
    k = encode("t", x, "topk", fraction=0.5, values="fp16")
    assert KERNELS["topk"].check(k)
    assert not KERNELS["topk"].check(_with_bits(k, pos * k.nnz // size, FP16_NONFINITE[bad]))


def _with_scale(t: Tensor, block: int, value: float) -> Tensor:
    s = np.frombuffer(t.scales, "<f4").copy()
    s[block] = value
    return dataclasses.replace(t, scales=s.tobytes())


@pytest.mark.parametrize("codec", ["int8", "topk"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 3, -1])
def test_check_finds_a_nonfinite_int8_scale_anywhere(codec: str, value: float,
                                                     where: int) -> None:
    t = encode("t", random_finite(7, 2000, "normal"), codec, block=64, fraction=0.2)
    assert KERNELS[codec].check(t)
    assert not KERNELS[codec].check(_with_scale(t, where, value))


def test_check_finds_int8_values_whose_product_overflows_float32() -> None:
    big = FLT_MAX / 100  # finite, but 127 * big is not
    q = np.array([1, -2, 0, 0], np.int8)
    t = Tensor("q", "float32", (4,), "int8", q.tobytes(), block=2,
               scales=np.array([big, big], "<f4").tobytes())
    assert KERNELS["int8"].check(t)  # |q| <= 2: every product is finite
    over = dataclasses.replace(t, data=np.array([1, -2, 0, 127], np.int8).tobytes())
    assert not KERNELS["int8"].check(over)
    # A zero block with a huge finite scale is fine; a zero block with an infinite scale is not.
    assert KERNELS["int8"].check(_with_scale(t, 1, FLT_MAX))
    assert not KERNELS["int8"].check(_with_scale(t, 1, math.inf))


def _topk(indices: list[int], span: int = 10, values: str = "int8") -> Tensor:
    k = len(indices)
    base = Tensor("t", "float32", (span,), "topk", b"", indices=np.array(indices, "<u4").tobytes(),
                  values=values)
    if values == "fp16":
        return dataclasses.replace(base, data=np.ones(k, "<f2").tobytes())
    return dataclasses.replace(base, data=np.ones(k, np.int8).tobytes(), block=2,
                               scales=np.ones(blocks(k, 2), "<f4").tobytes())


BAD_INDICES = {
    "unsorted": [1, 5, 3],
    "duplicate": [1, 4, 4],
    "out-of-range": [2, 3, 10],
    "far-out-of-range": [0, 2**32 - 1],
    "first-out-of-range": [10],
}


@pytest.mark.parametrize("values", ["int8", "fp16"])
@pytest.mark.parametrize("bad", sorted(BAD_INDICES))
def test_bad_topk_indices_fail_check_and_fold_leaving_acc_unchanged(values: str,
                                                                   bad: str) -> None:
    good = _topk([0, 3, 9], values=values)
    assert KERNELS["topk"].check(good)
    t = _topk(BAD_INDICES[bad], values=values)
    assert KERNELS["topk"].check(t) is False
    acc = np.arange(10.0)
    with pytest.raises(ValueError, match="indices must be strictly increasing and below 10"):
        KERNELS["topk"].fold(acc, t, 1.0)
    np.testing.assert_array_equal(acc, np.arange(10.0))
    with pytest.raises(ValueError, match="strictly increasing"):
        decode_range(t)


def test_topk_indices_are_relative_to_the_range() -> None:
    x = np.zeros(20, np.float32)
    x[[12, 15]] = [3.0, -4.0]
    t = encode("t", x, "topk", fraction=0.2, values="fp16", offset=10, count=8)
    assert t.nnz == 2
    np.testing.assert_array_equal(np.frombuffer(t.indices, "<u4"), [2, 5])
    acc = np.zeros(20)
    fold(acc, t, 1.0)
    np.testing.assert_array_equal(acc, x)
    # Index 8 is inside the tensor but outside this range of 8 elements.
    assert not KERNELS["topk"].check(dataclasses.replace(
        t, indices=np.array([2, 8], "<u4").tobytes()))


def _malformed() -> dict[str, Tensor]:
    x = np.linspace(-1, 1, 10, dtype=np.float32)
    i8 = encode("t", x, "int8", block=4)
    f16 = encode("t", x, "fp16")
    tk = encode("t", x, "topk", fraction=0.5, block=2)
    tf = encode("t", x, "topk", fraction=0.5, values="fp16")
    return {
        "fp16-short": dataclasses.replace(f16, data=f16.data[:-2]),
        "fp16-odd": dataclasses.replace(f16, data=f16.data[:-1]),
        "fp16-with-scales": dataclasses.replace(f16, block=4, scales=bytes(12)),
        "int8-short": dataclasses.replace(i8, data=i8.data[:-1]),
        "int8-no-block": dataclasses.replace(i8, block=0),
        "int8-missing-scale": dataclasses.replace(i8, scales=i8.scales[:-4]),
        "int8-extra-scale": dataclasses.replace(i8, scales=bytes(i8.scales) + bytes(4)),
        "int8-range-outside": dataclasses.replace(i8, offset=1),
        "topk-values-unknown": dataclasses.replace(tk, values="fp32"),
        "topk-index-bytes-odd": dataclasses.replace(tk, indices=tk.indices[:-1]),
        "topk-more-indices-than-span": dataclasses.replace(
            tk, shape=(2,), indices=np.arange(5, dtype="<u4").tobytes()),
        "topk-values-short": dataclasses.replace(tk, data=tk.data[:-1]),
        "topk-scales-short": dataclasses.replace(tk, scales=tk.scales[:-4]),
        "topk-fp16-values-short": dataclasses.replace(tf, data=tf.data[:-2]),
        "topk-fp16-with-block": dataclasses.replace(tf, block=2),
    }


@pytest.mark.parametrize("name", sorted(_malformed()))
def test_a_malformed_tensor_fails_check_and_raises_on_fold_norm_and_decode(name: str) -> None:
    t = _malformed()[name]
    k = KERNELS[t.codec]
    assert k.check(t) is False
    acc = np.zeros(t.span if t.span >= 0 else 0)
    with pytest.raises(ValueError, match=r"tensor 't'"):
        k.fold(acc, t, 1.0)
    np.testing.assert_array_equal(acc, 0.0)
    with pytest.raises(ValueError, match=r"tensor 't'"):
        k.sq_norm(t)
    with pytest.raises(ValueError, match=r"tensor 't'"):
        decode_range(t)


@pytest.mark.parametrize("codec", CODECS)
def test_kernels_refuse_a_tensor_of_another_codec(codec: str) -> None:
    other = encode("t", [1.0, 2.0], "fp32" if codec != "fp32" else "fp16")
    for call in (lambda: KERNELS[codec].fold(np.zeros(2), other, 1.0),
                 lambda: KERNELS[codec].check(other), lambda: KERNELS[codec].sq_norm(other)):
        with pytest.raises(ValueError, match=f"this is the {codec} kernel"):
            call()


@pytest.mark.parametrize("codec", CODECS)
def test_fold_checks_acc_length_and_weight(codec: str) -> None:
    t = encode("t", np.ones(10), codec, fraction=0.5, offset=2, count=6)
    with pytest.raises(ValueError, match=r"acc has 10 elements; tensor 't' covers 6 \(\[2, 8\)\)"):
        KERNELS[codec].fold(np.zeros(10), t, 1.0)
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        KERNELS[codec].fold(np.zeros(6), t, -1.0)
    with pytest.raises(ValueError, match="acc is read-only"):
        KERNELS[codec].fold(np.frombuffer(bytes(48)), t, 1.0)


# ---------------------------------------------------------------- encoders → reference decoder


finite_arrays = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=12),
    elements=st.floats(-FLT_MAX, FLT_MAX, width=32))


@SETTINGS
@given(finite_arrays)
def test_fp32_round_trip_is_exact(x: F32) -> None:
    t = encode("t", x, "fp32")
    np.testing.assert_array_equal(decode(t), x)
    assert decode(t).dtype == np.float32
    assert not decode(t).flags.writeable


@SETTINGS
@given(finite_arrays)
def test_fp16_round_trip_is_within_half_precision_and_saturates(x: F32) -> None:
    t = encode("t", x, "fp16")
    assert len(t.data) == 2 * x.size
    d = decode(t)
    assert d.shape == x.shape
    assert np.isfinite(d).all()
    inside = np.abs(x) <= FP16_MAX
    # Round to nearest: half an ulp, 2**-11 relative for normals, 2**-25 absolute below them.
    err = np.abs(d[inside].astype(np.float64) - x[inside])
    assert (err <= np.abs(x[inside]) * 2.0**-11 + 2.0**-25).all()
    np.testing.assert_array_equal(d[~inside], np.sign(x[~inside]) * FP16_MAX)


def test_fp16_keeps_nan_and_inf_for_the_aggregator_to_see() -> None:
    d = decode(encode("t", [np.nan, np.inf, -np.inf, 1e9], "fp16"))
    assert np.isnan(d[0])
    np.testing.assert_array_equal(d[1:], [np.inf, -np.inf, FP16_MAX])


def _scales_per_value(t: Tensor, n: int) -> F32:
    return np.repeat(np.frombuffer(t.scales, "<f4"), t.block)[:n]


@SETTINGS
@given(finite_arrays, st.integers(1, 40))
def test_int8_error_is_at_most_half_a_scale(x: F32, block: int) -> None:
    t = encode("t", x, "int8", block=block)
    n = x.size
    assert (len(t.data), len(t.scales), t.block) == (n, 4 * blocks(n, block), block)
    q = np.frombuffer(t.data, np.int8)
    assert (np.abs(q.astype(np.int64)) <= 127).all()
    d = decode(t).reshape(-1)
    assert np.isfinite(d).all()
    s = _scales_per_value(t, n).astype(np.float64)
    flat = x.reshape(-1).astype(np.float64)
    # scale/2 from rounding, plus float32 rounding of q * scale (|q| <= 127: 127 * 2**-24 scales).
    assert (np.abs(d - flat) <= s * (0.5 + 1e-5) + SCALE_SLACK).all()
    # absmax / 127 per block (0 for an all-zero block), so the largest value maps to ±127.
    for b in range(blocks(n, block)):
        part = flat[b * block:(b + 1) * block]
        m = float(np.max(np.abs(part)))
        scale = float(np.frombuffer(t.scales, "<f4")[b])
        if m == 0:
            assert scale == 0.0
        else:
            assert scale == pytest.approx(m / 127, rel=2**-23, abs=TINY)


def test_int8_extremes_stay_finite() -> None:
    x = np.array([FLT_MAX, -FLT_MAX, TINY, -TINY, 0.0, 3 * TINY], np.float32)
    for block in (1, 2, 6):
        t = encode("t", x, "int8", block=block)
        d = decode(t)
        assert np.isfinite(d).all()
        assert KERNELS["int8"].check(t)
        assert d[0] == pytest.approx(FLT_MAX, rel=1e-6)


def test_int8_and_topk_refuse_nonfinite_input() -> None:
    for codec in ("int8", "topk"):
        with pytest.raises(ValueError, match="needs finite values"):
            encode("t", [1.0, np.nan], codec, fraction=1.0)
    with pytest.raises(ValueError, match="needs finite values"):
        quantize([np.inf])


@SETTINGS
@given(finite_arrays, options("topk"))
def test_topk_keeps_the_k_largest_magnitudes(x: F32, opts: Options) -> None:
    t = opts.encode("t", x)
    n = x.size
    k = min(n, max(1, round(opts.fraction * n))) if n else 0
    assert t.nnz == k
    idx = np.frombuffer(t.indices, "<u4").astype(np.int64)
    assert (np.diff(idx) > 0).all()
    assert (idx < n).all()
    flat = x.reshape(-1)
    kept = np.zeros(n, bool)
    kept[idx] = True
    if 0 < k < n:
        assert np.abs(flat[kept]).min() >= np.abs(flat[~kept]).max()
    d = decode(t).reshape(-1)
    np.testing.assert_array_equal(d[~kept], 0.0)
    if opts.values == "fp16":
        expected = np.clip(flat[idx], -FP16_MAX, FP16_MAX).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(d[idx], expected)
        assert len(t.data) == 2 * k
        assert (t.block, t.scales) == (0, b"")
    else:
        s = _scales_per_value(t, k).astype(np.float64)
        err = np.abs(d[idx] - flat[idx].astype(np.float64))
        assert (err <= s * (0.5 + 1e-5) + SCALE_SLACK).all()
        assert (len(t.data), len(t.scales)) == (k, 4 * blocks(k, opts.block))


def test_topk_size_at_one_percent() -> None:
    x = random_finite(3, 1_000_000, "normal")
    t = encode("t", x, "topk")
    assert t.nnz == 10_000
    # 4 index bytes + 1 value byte per kept entry, 4 bytes per 256 values of scales.
    assert len(t.data) + len(t.indices) + len(t.scales) == 10_000 * 5 + 4 * blocks(10_000, 256)
    assert encode("t", x[:10], "topk").nnz == 1  # at least one entry
    assert encode("t", np.zeros(0, np.float32), "topk").nnz == 0


@SETTINGS
@given(finite_arrays, options(), st.data())
def test_encoding_a_range_equals_encoding_that_slice(x: F32, opts: Options,
                                                     data: st.DataObject) -> None:
    n = x.size
    offset = data.draw(st.integers(0, n))
    count = data.draw(st.integers(0, n - offset))
    t = opts.encode("t", x, offset, count)
    assert (t.shape, t.offset, t.span) == (x.shape, offset, count)
    whole = opts.encode("t", x.reshape(-1)[offset:offset + count])
    assert (t.data, t.scales, t.indices) == (whole.data, whole.scales, whole.indices)
    np.testing.assert_array_equal(decode_range(t), decode_range(whole))
    if (offset, count) != (0, n):
        with pytest.raises(ValueError, match="use decode_range"):
            decode(t)


@SETTINGS
@given(finite_arrays, options(), st.data())
def test_encoded_tensors_survive_the_wire_unchanged(x: F32, opts: Options,
                                                   data: st.DataObject) -> None:
    n = x.size
    offset = data.draw(st.integers(0, n))
    count = data.draw(st.one_of(st.none(), st.integers(0, n - offset)))
    t = opts.encode("t", x, offset, count)
    update = ModelUpdate("fed", "dev", 1, 0, "u", 5, (t,))
    back = wire_codec.decode(wire_codec.encode(update))
    assert isinstance(back, ModelUpdate)
    (u,) = back.tensors
    assert dataclasses.replace(u, count=u.span) == dataclasses.replace(t, count=t.span)
    np.testing.assert_array_equal(decode_range(u), decode_range(t))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"codec": "bf16"}, "codec 'bf16' is not supported"),
        ({"codec": "int8", "block": 0}, r"block must be an integer in \[1, 16777216\]"),
        ({"codec": "int8", "block": 2.0}, "block must be an integer"),
        ({"codec": "topk", "fraction": 0.0}, r"fraction must be in \(0, 1\]"),
        ({"codec": "topk", "fraction": 1.5}, "fraction must be in"),
        ({"codec": "topk", "fraction": math.nan}, "fraction must be in"),
        ({"codec": "topk", "values": "fp32"}, "topk values must be one of int8, fp16"),
        ({"offset": 3}, "offset 3 is outside the array's 2 elements"),
        ({"offset": -1}, "offset -1 is outside"),
        ({"count": 3}, r"range \[0, 3\) is outside the array's 2 elements"),
        ({"offset": 1, "count": -1}, r"range \[1, 0\) is outside"),
    ],
)
def test_encode_rejects_bad_options(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        encode("t", [1.0, 2.0], **kwargs)


def test_encode_all_and_decode_all_keep_names_order_and_shapes() -> None:
    w = {"b": np.ones((2, 3), np.float32), "a": np.arange(4, dtype=np.float32)}
    for c in CODECS:
        tensors = encode_all(w, c, block=2, fraction=0.5, values="fp16")
        assert [t.name for t in tensors] == ["b", "a"]
        assert {n: a.shape for n, a in decode_all(tensors).items()} == {"b": (2, 3), "a": (4,)}
    np.testing.assert_array_equal(decode_all(encode_all(w))["a"], w["a"])


# ---------------------------------------------------------------- FedAvg over every codec


@pytest.mark.parametrize("codec", CODECS)
def test_fedavg_over_compressed_updates_equals_the_mean_of_their_decodings(codec: str) -> None:
    rng = np.random.default_rng(0)
    base = {"w": rng.standard_normal((30, 7)).astype(np.float32),
            "b": rng.standard_normal(5).astype(np.float32)}
    updates = [encode_all({n: rng.standard_normal(a.shape).astype(np.float32)
                           for n, a in base.items()}, codec, block=16, fraction=0.1)
               for _ in range(4)]
    weights = [3.0, 1.0, 7.0, 2.0]
    s = FedAvg(ModelSpec.from_weights(base))
    s.init(base)
    for u, w in zip(updates[::-1], weights[::-1], strict=True):
        s.fold(u, w)
    expected = naive.fedavg(base, [decode_all(u) for u in updates], weights)
    for name, got in s.finalize().items():
        np.testing.assert_allclose(got, expected[name], rtol=2**-23, atol=1e-7)


# ---------------------------------------------------------------- error feedback


def test_error_feedback_carries_the_residual_to_the_next_round() -> None:
    fb = ErrorFeedback(None)
    delta = {"w": np.array([1.0, 0.1, -0.05, 0.02], np.float32)}
    sent1 = encode_with_feedback(delta, "topk", fb, fraction=0.25, values="fp16")
    np.testing.assert_array_equal(decode(sent1[0]), [1.0, 0, 0, 0])
    np.testing.assert_allclose(fb.residual["w"], [0.0, 0.1, -0.05, 0.02], atol=1e-3)
    compensated = fb.compensate({"w": np.zeros(4, np.float32)})
    np.testing.assert_array_equal(compensated["w"], fb.residual["w"])
    # The next round sends the largest carried entry, and the caller's arrays are not touched.
    sent2 = encode_with_feedback({"w": np.zeros(4, np.float32)}, "topk", fb, fraction=0.25,
                                 values="fp16")
    np.testing.assert_allclose(decode(sent2[0]), [0, 0.1, 0, 0], rtol=1e-3)
    np.testing.assert_array_equal(delta["w"], np.array([1.0, 0.1, -0.05, 0.02], np.float32))
    # What was sent plus what is carried is exactly what was meant to be sent.
    total_sent = decode(sent1[0]) + decode(sent2[0])
    np.testing.assert_allclose(total_sent + fb.residual["w"], delta["w"], atol=1e-7)


def test_encode_with_feedback_none_is_encode_all() -> None:
    w = {"a": np.linspace(-1, 1, 50, dtype=np.float32)}
    assert encode_with_feedback(w, "int8", None, block=8) == encode_all(w, "int8", block=8)


@pytest.mark.parametrize("values", ["int8", "fp16"])
def test_topk_with_error_feedback_tracks_the_sum_of_intended_deltas(values: str) -> None:
    """The point of error feedback: at 10% density the sum of what was sent stays within one
    residual of the sum of the true deltas; without it the unsent 90% is lost for good."""
    rng = np.random.default_rng(1)
    n, rounds = 2000, 150
    drift = (rng.standard_normal(n) * 0.01).astype(np.float32)
    errors = {}
    for use in (True, False):
        fb = ErrorFeedback(None) if use else None
        sent_sum, true_sum = np.zeros(n), np.zeros(n)
        r = np.random.default_rng(2)
        for _ in range(rounds):
            d = drift + (r.standard_normal(n) * 0.02).astype(np.float32)
            (t,) = encode_with_feedback({"w": d}, "topk", fb, fraction=0.1, values=values)
            sent_sum += decode(t)
            true_sum += d
        errors[use] = float(np.linalg.norm(sent_sum - true_sum) / np.linalg.norm(true_sum))
        if fb is not None:  # exactly one residual apart (up to float32 rounding)
            np.testing.assert_allclose(sent_sum + fb.residual["w"], true_sum, atol=1e-4)
    assert errors[True] < 0.05
    assert errors[True] < errors[False] / 10


def test_error_feedback_persists_across_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "feedback.npz"
    names = ["dense/kernel", "émoji 🙂", "../x", "r0"]
    fb = ErrorFeedback(path)
    delta = {n: np.full((2, 3), i + 0.5, np.float32) for i, n in enumerate(names)}
    intended = fb.compensate(delta)
    fb.record({n: np.zeros((2, 3), np.float32) for n in names}, intended)
    fb.save()
    assert path.exists()
    assert [p.name for p in path.parent.iterdir()] == ["feedback.npz"]  # no temporary left
    again = ErrorFeedback(path)
    assert list(again.residual) == names
    for n in names:
        np.testing.assert_array_equal(again.residual[n], delta[n])
        assert again.residual[n].dtype == np.float32
    np.testing.assert_array_equal(again.compensate(delta)["r0"], 2 * delta["r0"])
    # Saving replaces the file; reset forgets on disk too.
    again.record({"r0": np.ones((2, 3), np.float32)}, {"r0": np.ones((2, 3), np.float32)})
    again.save()
    np.testing.assert_array_equal(ErrorFeedback(path).residual["r0"], 0.0)
    again.reset()
    assert not path.exists()
    assert dict(again.residual) == {}
    assert dict(ErrorFeedback(path).residual) == {}


def test_error_feedback_starts_empty_from_a_corrupt_file(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "feedback.npz"
    path.write_bytes(b"not a zip file")
    with caplog.at_level(logging.WARNING, logger="fedmq.compression"):
        fb = ErrorFeedback(path)
    assert dict(fb.residual) == {}
    assert "cannot read" in caplog.text
    fb.record({"w": np.zeros(2, np.float32)}, {"w": np.ones(2, np.float32)})
    fb.save()
    np.testing.assert_array_equal(ErrorFeedback(path).residual["w"], [1.0, 1.0])


def test_error_feedback_without_a_path_saves_nothing_and_is_truthy() -> None:
    fb = ErrorFeedback(None)
    fb.save()
    fb.reset()
    # Callers write ``feedback or ErrorFeedback(None)``: an empty one must not look false.
    assert bool(fb)


def test_error_feedback_drops_a_residual_whose_shape_changed(
        caplog: pytest.LogCaptureFixture) -> None:
    fb = ErrorFeedback(None)
    fb.record({"w": np.zeros(3, np.float32)}, {"w": np.ones(3, np.float32)})
    with caplog.at_level(logging.WARNING, logger="fedmq.compression"):
        out = fb.compensate({"w": np.ones(4, np.float32)})
    np.testing.assert_array_equal(out["w"], np.ones(4))
    assert "dropping the residual" in caplog.text
    assert "w" not in fb.residual


def test_error_feedback_record_checks_names_and_shapes_and_zeroes_nonfinite(
        caplog: pytest.LogCaptureFixture) -> None:
    fb = ErrorFeedback(None)
    with pytest.raises(ValueError, match="sent has tensors"):
        fb.record({"a": np.zeros(1)}, {"b": np.zeros(1)})
    with pytest.raises(ValueError, match="tensor 'a': sent has shape"):
        fb.record({"a": np.zeros(2)}, {"a": np.zeros(3)})
    with caplog.at_level(logging.WARNING, logger="fedmq.compression"):
        fb.record({"a": np.zeros(3, np.float32)},
                  {"a": np.array([np.nan, np.inf, 2.0], np.float32)})
    np.testing.assert_array_equal(fb.residual["a"], [0.0, 0.0, 2.0])
    assert "non-finite" in caplog.text


def test_error_feedback_keeps_residuals_of_tensors_not_in_this_update() -> None:
    fb = ErrorFeedback(None)
    fb.record({"a": np.zeros(1, np.float32), "b": np.zeros(1, np.float32)},
              {"a": np.ones(1, np.float32), "b": np.ones(1, np.float32)})
    fb.record({"a": np.ones(1, np.float32)}, {"a": np.ones(1, np.float32)})
    assert (float(fb.residual["a"][0]), float(fb.residual["b"][0])) == (0.0, 1.0)


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.integers(0, 300), st.integers(1, 40),
       st.sampled_from(["int8", "topk"]))
def test_check_agrees_with_numpy_for_any_scale_bits(seed: int, n: int, block: int,
                                                    codec: str) -> None:
    """Random float32 scale bit patterns, NaN, inf and scales next to the overflow edge
    included: check is True exactly when every decoded value is finite."""
    rng = np.random.default_rng(seed)
    q = rng.integers(-128, 128, n).astype(np.int8)
    bits = rng.integers(0, 2**32, blocks(n, block), dtype=np.uint32)
    edge = np.float32(FLT_MAX / 127).view(np.uint32)  # around where 127 * scale overflows
    near = rng.random(bits.size) < 0.5
    bits[near] = edge + rng.integers(-3, 4, int(near.sum())).astype(np.uint32)
    t = Tensor("t", "float32", (n,), "int8", q.tobytes(), block=block,
               scales=bits.astype("<u4").tobytes())
    if codec == "topk":
        t = dataclasses.replace(t, shape=(2 * n,), codec="topk", values="int8",
                                indices=(2 * np.arange(n)).astype("<u4").tobytes())
    with np.errstate(over="ignore", invalid="ignore"):
        expected = bool(np.isfinite(decode_range(t)).all())
    assert KERNELS[codec].check(t) is expected


@SETTINGS
@given(n=st.integers(0, 300), block=st.sampled_from([1, 3, 8, 12, 256]),
       codec=st.sampled_from(["fp32", "fp16", "int8", "topk"]), seed=st.integers(0, 2**31))
def test_sq_norm_is_the_lane_order_sum_to_the_bit(n: int, block: int, codec: str,
                                                  seed: int) -> None:
    # The clip factor is bound / sqrt(sq_norm): references reproduce it only if they can
    # reproduce the norm's bits (docs/robustness.md; naive.lane_sq_norm).
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32) * 3
    t = encode("x", x, codec, block=block, fraction=0.5)
    values = decode_range(t)
    if codec == "topk":  # only the kept values count (the rest are 0), in index order
        values = values[np.frombuffer(t.indices or b"", "<u4").astype(np.int64)]
    assert KERNELS[codec].sq_norm(t) == naive.lane_sq_norm(values)
