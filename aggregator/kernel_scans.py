"""Read-only kernels over a tensor's encoded values: is every value finite, and the squared L2
norm (for the norm bound, ``aggregator.robust``). Wrapped and dispatched by ``aggregator.kernels``.
"""

from __future__ import annotations

import numpy as np

from aggregator.kernel_args import F32, I8, U16, U32
from aggregator.kernel_jit import _half, _jit

# Bit pattern of a float32 whose exponent is all ones: inf or NaN, whatever the sign and payload.
_EXP_MASK = np.uint32(0x7F800000)
# The same for IEEE binary16.
_EXP_MASK16 = np.uint16(0x7C00)
# Elements checked between early exits: large enough to vectorize, small enough to stop soon.
_FINITE_BLOCK = 4096
# Exact products at or above this round to inf in float32: FLT_MAX = 2**128 - 2**104, and the
# midpoint to 2**128 rounds to even, which is 2**128.
_F32_OVERFLOW = 2.0**128 - 2.0**103


@_jit
def _all_finite_fp32(bits: U32) -> bool:
    # Counting exponent-all-ones words is an integer reduction, which vectorizes without fastmath;
    # the inner loop has a constant trip count (LLVM does not vectorize a min()-bounded one) and
    # the early exit is per block, so a bad value near the start is found quickly.
    n_blocks = bits.size // _FINITE_BLOCK
    for b in range(n_blocks):
        start = b * _FINITE_BLOCK
        bad = 0
        for j in range(_FINITE_BLOCK):
            bad += (bits[start + j] & _EXP_MASK) == _EXP_MASK
        if bad:
            return False
    bad = 0
    for i in range(n_blocks * _FINITE_BLOCK, bits.size):
        bad += (bits[i] & _EXP_MASK) == _EXP_MASK
    return bad == 0


@_jit
def _all_finite_fp16(bits: U16) -> bool:
    # As _all_finite_fp32, on binary16 bit patterns.
    n_blocks = bits.size // _FINITE_BLOCK
    for b in range(n_blocks):
        start = b * _FINITE_BLOCK
        bad = 0
        for j in range(_FINITE_BLOCK):
            bad += (bits[start + j] & _EXP_MASK16) == _EXP_MASK16
        if bad:
            return False
    bad = 0
    for i in range(n_blocks * _FINITE_BLOCK, bits.size):
        bad += (bits[i] & _EXP_MASK16) == _EXP_MASK16
    return bad == 0


@_jit
def _all_finite_int8(q: I8, scales: F32, block: int) -> bool:
    # A value is float32(q) * scale: finite iff the scale is finite and the product does not
    # overflow, i.e. the exact product (exact in float64: 8 bits times 24) is below the float32
    # overflow threshold. |q| <= 128, so for most scales the block's bytes need not be read;
    # otherwise the largest |q| decides. (No float32 overflow is computed: no warnings either.)
    n = q.size
    for b in range(scales.size):
        s = abs(np.float64(scales[b]))
        if not np.isfinite(s):
            return False
        if 128.0 * s < _F32_OVERFLOW:
            continue
        top = np.int64(0)
        v = q[b * block:min(b * block + block, n)]
        for i in range(v.size):
            x = np.int64(v[i])  # widened first: in numba abs() of int8 -128 stays -128
            top = max(top, -x if x < 0 else x)
        if np.float64(top) * s >= _F32_OVERFLOW:
            return False
    return True


# ---------------------------------------------------------------- kernels: squared norm


# Eight independent float64 sums, lane j taking elements i with i % 8 == j in order, combined
# pairwise at the end: a fixed order (the same bits on every machine, and a reference can
# reproduce it: tests/unit/naive.py), yet no chain of dependent additions, so the loop runs at
# memory speed instead of one add latency per element (1M fp32: 0.51 -> 0.1 ms measured).
_LANES = 8


@_jit
def _combine(s0: float, s1: float, s2: float, s3: float,  # noqa: PLR0917
             s4: float, s5: float, s6: float, s7: float) -> float:
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@_jit
def _sq_norm_fp32(x: F32) -> float:
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    n = x.size
    full = n - n % _LANES
    for i in range(0, full, _LANES):
        v0 = np.float64(x[i])
        v1 = np.float64(x[i + 1])
        v2 = np.float64(x[i + 2])
        v3 = np.float64(x[i + 3])
        v4 = np.float64(x[i + 4])
        v5 = np.float64(x[i + 5])
        v6 = np.float64(x[i + 6])
        v7 = np.float64(x[i + 7])
        s0 += v0 * v0
        s1 += v1 * v1
        s2 += v2 * v2
        s3 += v3 * v3
        s4 += v4 * v4
        s5 += v5 * v5
        s6 += v6 * v6
        s7 += v7 * v7
    tail = np.zeros(_LANES)
    for i in range(full, n):
        v = np.float64(x[i])
        tail[i - full] = v * v
    return _combine(s0 + tail[0], s1 + tail[1], s2 + tail[2], s3 + tail[3],
                    s4 + tail[4], s5 + tail[5], s6 + tail[6], s7 + tail[7])


@_jit
def _sq_norm_fp16(h: U16) -> float:
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    n = h.size
    full = n - n % _LANES
    for i in range(0, full, _LANES):
        v0 = _half(h[i])
        v1 = _half(h[i + 1])
        v2 = _half(h[i + 2])
        v3 = _half(h[i + 3])
        v4 = _half(h[i + 4])
        v5 = _half(h[i + 5])
        v6 = _half(h[i + 6])
        v7 = _half(h[i + 7])
        s0 += v0 * v0
        s1 += v1 * v1
        s2 += v2 * v2
        s3 += v3 * v3
        s4 += v4 * v4
        s5 += v5 * v5
        s6 += v6 * v6
        s7 += v7 * v7
    tail = np.zeros(_LANES)
    for i in range(full, n):
        v = _half(h[i])
        tail[i - full] = v * v
    return _combine(s0 + tail[0], s1 + tail[1], s2 + tail[2], s3 + tail[3],
                    s4 + tail[4], s5 + tail[5], s6 + tail[6], s7 + tail[7])


@_jit
def _sq_norm_int8_aligned(q: I8, scales: F32, block: int) -> float:
    # Blocks start on multiples of 8: every group of 8 shares one scale, and only the last
    # group of the tensor can be partial. The same sums, in the same order, as the general case.
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    n = q.size
    full = n - n % _LANES
    for i in range(0, full, _LANES):
        s = scales[i // block]
        v0 = np.float64(np.float32(q[i]) * s)
        v1 = np.float64(np.float32(q[i + 1]) * s)
        v2 = np.float64(np.float32(q[i + 2]) * s)
        v3 = np.float64(np.float32(q[i + 3]) * s)
        v4 = np.float64(np.float32(q[i + 4]) * s)
        v5 = np.float64(np.float32(q[i + 5]) * s)
        v6 = np.float64(np.float32(q[i + 6]) * s)
        v7 = np.float64(np.float32(q[i + 7]) * s)
        s0 += v0 * v0
        s1 += v1 * v1
        s2 += v2 * v2
        s3 += v3 * v3
        s4 += v4 * v4
        s5 += v5 * v5
        s6 += v6 * v6
        s7 += v7 * v7
    tail = np.zeros(_LANES)
    for i in range(full, n):
        v = np.float64(np.float32(q[i]) * scales[i // block])
        tail[i - full] = v * v
    return _combine(s0 + tail[0], s1 + tail[1], s2 + tail[2], s3 + tail[3],
                    s4 + tail[4], s5 + tail[5], s6 + tail[6], s7 + tail[7])


@_jit
def _sq_norm_int8(q: I8, scales: F32, block: int) -> float:
    if block % _LANES == 0:
        return _sq_norm_int8_aligned(q, scales, block)
    # Lanes by the global index (i % 8), whatever the block size.
    lanes = np.zeros(_LANES)
    n = q.size
    for b in range(scales.size):
        s = scales[b]
        start = b * block
        stop = min(start + block, n)
        i = start
        # Up to the next multiple of 8, one by one; then whole groups; then the rest.
        head = min(stop, start + (-start) % _LANES)
        while i < head:
            x = np.float64(np.float32(q[i]) * s)
            lanes[i % _LANES] += x * x
            i += 1
        while i + _LANES <= stop:
            for j in range(_LANES):
                x = np.float64(np.float32(q[i + j]) * s)
                lanes[j] += x * x
            i += _LANES
        while i < stop:
            x = np.float64(np.float32(q[i]) * s)
            lanes[i % _LANES] += x * x
            i += 1
    return _combine(lanes[0], lanes[1], lanes[2], lanes[3],
                    lanes[4], lanes[5], lanes[6], lanes[7])
