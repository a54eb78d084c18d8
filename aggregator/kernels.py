"""Numba kernels that work directly on a tensor's encoded bytes, each behind a checked wrapper.

Every private ``_kernel`` is ``njit(**FLAGS)`` (see ``aggregator.kernel_config``) and trusts its
arguments; its public wrapper checks the tensor's fields and byte lengths, the accumulator and the
weight, and raises a ``ValueError`` that says what was wrong. Wrappers turn every buffer into one
kind of array (1-D, C-contiguous, aligned, read-only, native byte order) so each kernel has a
single specialization and ``warmup()`` compiles everything a round will use.

``KERNELS`` maps a codec name (``Tensor.codec``) to its ``CodecKernels(fold, check, sq_norm)``:

``fold(acc_segment, t, weight)``
    ``acc_segment += weight * decode_range(t)`` in one pass over the encoded bytes: decode,
    dequantize, weight and add per element, with no temporary of the tensor's size. ``acc_segment``
    is the float64 slice of the accumulator for ``[offset, offset + span)`` of that tensor. The
    result has the same bits as the numpy reference ``acc + w * float64(decode_range(t))``
    (``fastmath`` is off). ``topk`` touches only its k positions and validates its indices first,
    so a bad one raises before anything is added.
``check(t)``
    True iff every decoded value is finite and the encoding is structurally valid (byte lengths,
    topk indices strictly increasing and below ``span``, int8 scales finite).
``sq_norm(t)``
    the squared L2 norm of the decoded values, accumulated in float64 (for clipping).

The codecs are specified in docs/protocol.md ("Codecs"); ``fedmq.compression`` holds the
encoders and the reference decoder. ``fp16`` is decoded from its uint16 bits (numba has no float16
type on the CPU): with the hardware conversion where the CPU has one (``fpext half``: F16C on x86,
AArch64), else by splitting sign, exponent and mantissa and rebuilding the value exactly in
float64, subnormals, infinities and NaN included. Both are exact: the same values as numpy's cast.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar, cast

import numpy as np
import numpy.typing as npt
from llvmlite import binding as llvm_binding  # type: ignore[import-untyped]
from llvmlite import ir
from numba import config as numba_config
from numba import njit, types
from numba.extending import intrinsic

from aggregator.kernel_config import FLAGS, JitFlags
from fedmq.compression import encode
from fedmq.wire import TOPK_VALUES, Tensor, blocks

__all__ = [
    "KERNELS",
    "Buffer",
    "CodecKernels",
    "all_finite_fp32",
    "check_fp16",
    "check_fp32",
    "check_int8",
    "check_topk",
    "fold_fp16",
    "fold_fp32",
    "fold_int8",
    "fold_topk",
    "sq_norm_fp16",
    "sq_norm_fp32",
    "sq_norm_int8",
    "sq_norm_topk",
    "warmup",
]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I8 = npt.NDArray[np.int8]
U16 = npt.NDArray[np.uint16]
U32 = npt.NDArray[np.uint32]
#: What encoded bytes may arrive as: bytes, or an array over them.
Buffer = bytes | bytearray | memoryview | npt.NDArray[Any]

_F = TypeVar("_F", bound=Callable[..., Any])

# Bit pattern of a float32 whose exponent is all ones: inf or NaN, whatever the sign and payload.
_EXP_MASK = np.uint32(0x7F800000)
# The same for IEEE binary16.
_EXP_MASK16 = np.uint16(0x7C00)
# Elements checked between early exits: large enough to vectorize, small enough to stop soon.
_FINITE_BLOCK = 4096
# Exact products at or above this round to inf in float32: FLT_MAX = 2**128 - 2**104, and the
# midpoint to 2**128 rounds to even, which is 2**128.
_F32_OVERFLOW = 2.0**128 - 2.0**103
# 2**-25: a binary16 value is (mantissa with its implicit bit) << exponent, times this.
_HALF_UNIT = 2.0**-25


@functools.cache
def _warn_no_cache() -> None:
    log.warning("no writable numba cache directory (set NUMBA_CACHE_DIR); compiling per process")


def _jit(fn: _F) -> _F:
    try:
        return cast(_F, njit(**FLAGS)(fn))
    except RuntimeError:
        # numba raises at decoration when no cache directory is writable (read-only install and
        # no writable HOME); compiling per process is better than failing to import.
        _warn_no_cache()
        uncached: JitFlags = {**FLAGS, "cache": False}
        return cast(_F, njit(**uncached)(fn))


# ---------------------------------------------------------------- kernels: helpers


@_jit
def _half_sw(bits: np.uint16) -> float:
    """The binary16 value with these bits, exactly, as float64, by integer arithmetic."""
    h = np.int64(bits)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    # Normal: (1024 + m) * 2**(e - 25); subnormal (e == 0): m * 2**-24 = (m << 1) * 2**-25.
    # The integer is below 2**41 and the scaling is a power of two, so every step is exact.
    sig = m + 0x400 if e != 0 else m
    shift = e if e != 0 else 1
    v = np.float64(sig << shift) * _HALF_UNIT
    if e == 0x1F:
        v = np.float64(np.inf) if m == 0 else np.float64(np.nan)
    return -v if h & 0x8000 else v


@intrinsic
def _half_hw(typingctx: object, bits: object) -> object:
    """The same in one instruction: LLVM's ``fpext half to double`` (vcvtph2pd / F16C on x86,
    fcvt on AArch64), which also vectorizes. Only used where the JIT target has it."""
    if bits != types.uint16:
        return None

    def codegen(context: object, builder: ir.IRBuilder, signature: object,
                args: list[ir.Value]) -> ir.Value:
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.DoubleType())

    return types.float64(types.uint16), codegen


def _hardware_half() -> bool:
    """True when the JIT target converts binary16 in hardware (x86 with F16C, AArch64).

    Elsewhere LLVM would call a runtime helper numba does not link; a fixed ``NUMBA_CPU_NAME`` /
    ``NUMBA_CPU_FEATURES`` (portable caches) and ``NUMBA_DISABLE_JIT`` use the integer version too.
    """
    # (numba.config sets these attributes at import, from the environment.)
    if any(getattr(numba_config, k, None) for k in ("DISABLE_JIT", "CPU_NAME", "CPU_FEATURES")):
        return False
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine in ("x86_64", "amd64"):
        try:
            return "+f16c" in llvm_binding.get_host_cpu_features().flatten().split(",")
        except RuntimeError:
            return False
    return False


#: binary16 bits → exact float64, for the kernels (both versions give the same values).
_half: Callable[[np.uint16], float] = cast(
    Callable[[np.uint16], float], _half_hw if _hardware_half() else _half_sw)


@_jit
def _first_bad_index(idx: U32, span: int) -> int:
    """Position of the first index not above its predecessor or not below ``span``; -1 if none."""
    prev = np.int64(-1)
    for j in range(idx.size):
        i = np.int64(idx[j])
        if i <= prev or i >= span:
            return j
        prev = i
    return -1


# ---------------------------------------------------------------- kernels: fold


@_jit
def _fold_fp32(acc: F64, x: F32, w: float) -> None:
    for i in range(acc.size):
        acc[i] += w * np.float64(x[i])


@_jit
def _fold_fp16(acc: F64, h: U16, w: float) -> None:
    for i in range(acc.size):
        acc[i] += w * _half(h[i])


@_jit
def _fold_int8(acc: F64, q: I8, scales: F32, block: int, w: float) -> None:
    # Block by block with the scale hoisted; value = float32(q) * scale rounded to float32 (the
    # codec's definition), then widened. Each block is a slice indexed from 0 so LLVM can prove
    # the index non-negative, drop numba's wraparound select and vectorize the inner loop.
    n = acc.size
    for b in range(scales.size):
        start = b * block
        stop = min(start + block, n)
        a = acc[start:stop]
        v = q[start:stop]
        s = scales[b]
        for i in range(a.size):
            a[i] += w * np.float64(np.float32(v[i]) * s)


# Grouped folds: the same sums as the single folds applied one update after another (per
# element the additions happen in update order, each rounded as before, so the result is bit for
# bit the same), but the accumulator is loaded and stored once per group instead of once per
# update: the single int8 fold is bound by those loads and stores, not by the arithmetic.


@_jit  # (numba kernels take plain positional arguments)
def _fold_fp32_2(acc: F64, x0: F32, x1: F32, w0: float, w1: float) -> None:
    for i in range(acc.size):
        acc[i] = acc[i] + w0 * np.float64(x0[i]) + w1 * np.float64(x1[i])


@_jit
def _fold_fp32_4(acc: F64, x0: F32, x1: F32, x2: F32, x3: F32,  # noqa: PLR0917
                 w0: float, w1: float, w2: float, w3: float) -> None:
    for i in range(acc.size):
        acc[i] = (acc[i] + w0 * np.float64(x0[i]) + w1 * np.float64(x1[i])
                  + w2 * np.float64(x2[i]) + w3 * np.float64(x3[i]))


@_jit
def _fold_fp16_2(acc: F64, h0: U16, h1: U16, w0: float, w1: float) -> None:
    for i in range(acc.size):
        acc[i] = acc[i] + w0 * _half(h0[i]) + w1 * _half(h1[i])


@_jit
def _fold_fp16_4(acc: F64, h0: U16, h1: U16, h2: U16, h3: U16,  # noqa: PLR0917
                 w0: float, w1: float, w2: float, w3: float) -> None:
    for i in range(acc.size):
        acc[i] = (acc[i] + w0 * _half(h0[i]) + w1 * _half(h1[i]) + w2 * _half(h2[i])
                  + w3 * _half(h3[i]))


@_jit
def _fold_int8_2(acc: F64, q0: I8, q1: I8, s0: F32, s1: F32, block: int,  # noqa: PLR0917
                 w0: float, w1: float) -> None:
    n = acc.size
    for b in range(s0.size):  # block by block, as _fold_int8
        start = b * block
        stop = min(start + block, n)
        a = acc[start:stop]
        v0 = q0[start:stop]
        v1 = q1[start:stop]
        c0 = s0[b]
        c1 = s1[b]
        for i in range(a.size):
            a[i] = (a[i] + w0 * np.float64(np.float32(v0[i]) * c0)
                    + w1 * np.float64(np.float32(v1[i]) * c1))


@_jit
def _fold_int8_4(acc: F64, q0: I8, q1: I8, q2: I8, q3: I8,  # noqa: PLR0917
                 s0: F32, s1: F32, s2: F32, s3: F32, block: int,
                 w0: float, w1: float, w2: float, w3: float) -> None:
    n = acc.size
    for b in range(s0.size):
        start = b * block
        stop = min(start + block, n)
        a = acc[start:stop]
        v0 = q0[start:stop]
        v1 = q1[start:stop]
        v2 = q2[start:stop]
        v3 = q3[start:stop]
        c0 = s0[b]
        c1 = s1[b]
        c2 = s2[b]
        c3 = s3[b]
        for i in range(a.size):
            a[i] = (a[i] + w0 * np.float64(np.float32(v0[i]) * c0)
                    + w1 * np.float64(np.float32(v1[i]) * c1)
                    + w2 * np.float64(np.float32(v2[i]) * c2)
                    + w3 * np.float64(np.float32(v3[i]) * c3))


@_jit  # (numba kernels take plain positional arguments)
def _fold_topk_int8(acc: F64, idx: U32, q: I8, scales: F32, block: int, w: float) -> int:  # noqa: PLR0917
    bad = _first_bad_index(idx, acc.size)
    if bad >= 0:
        return bad
    k = idx.size
    for b in range(scales.size):
        s = scales[b]
        for j in range(b * block, min(b * block + block, k)):
            acc[idx[j]] += w * np.float64(np.float32(q[j]) * s)
    return -1


@_jit
def _fold_topk_fp16(acc: F64, idx: U32, h: U16, w: float) -> int:
    bad = _first_bad_index(idx, acc.size)
    if bad >= 0:
        return bad
    for j in range(idx.size):
        acc[idx[j]] += w * _half(h[j])
    return -1


# ---------------------------------------------------------------- kernels: finiteness


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


# ---------------------------------------------------------------- argument checks


def _native(dtype: str) -> np.dtype[Any]:
    return np.dtype(dtype).newbyteorder("=")


def _as_wire(buf: Buffer, dtype: str, what: str, name: str) -> npt.NDArray[Any]:
    """View encoded bytes as the kernels' array type for the wire ``dtype`` (e.g. ``"<f4"``).

    Accepts bytes, bytearray, a contiguous memoryview, or a C-contiguous numpy array holding the
    raw bytes (uint8) or the values (the wire dtype in native byte order). Copies only unaligned
    input (or on a big-endian host); the result is 1-D and read-only.
    """
    wire = np.dtype(dtype)
    native = _native(dtype)
    where = f"tensor {name!r}: {what}" if name else what
    if isinstance(buf, np.ndarray):
        if buf.dtype not in (native, np.uint8) or not buf.dtype.isnative:
            raise ValueError(
                f"{where} has dtype {buf.dtype.str}; expected {native.name} "
                f"(native byte order) or uint8 (raw little-endian {native.name} bytes)"
            )
        if not buf.flags.c_contiguous:
            raise ValueError(f"{where} is not C-contiguous (shape {buf.shape}, strides "
                             f"{buf.strides})")
        if buf.dtype == np.uint8 and buf.size % wire.itemsize:
            raise ValueError(f"{where} has {buf.size} bytes, not a whole number "
                             f"of {native.name} values")
        # uint8 holds the wire bytes (little-endian); a typed array holds values (native order).
        a: npt.NDArray[Any] = buf.reshape(-1).view(native if buf.dtype == native else wire)
    else:
        try:
            mv = memoryview(buf)
        except TypeError:
            raise TypeError(f"{where} must be bytes, a memoryview or a numpy "
                            f"array, not {type(buf).__name__}") from None
        if not mv.c_contiguous:
            raise ValueError(f"{where} buffer is not C-contiguous")
        if mv.nbytes % wire.itemsize:
            raise ValueError(f"{where} has {mv.nbytes} bytes, not a whole number "
                             f"of {native.name} values")
        a = np.frombuffer(mv.cast("B"), dtype=wire)
    if not a.dtype.isnative:
        a = a.astype(native)  # big-endian hosts only
    if not a.flags.aligned:
        # numba types every array as aligned; a buffer sliced at an odd offset is copied instead.
        a = a.copy()
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def _check_acc(acc: F64) -> None:
    if not isinstance(acc, np.ndarray):
        raise TypeError(f"acc must be a numpy array, not {type(acc).__name__}")
    if acc.dtype != np.float64 or not acc.dtype.isnative:
        raise ValueError(f"acc has dtype {acc.dtype.str}; expected float64 (native byte order)")
    if acc.ndim != 1:
        raise ValueError(f"acc must be 1-D; got shape {acc.shape}")
    if not acc.flags.c_contiguous:
        raise ValueError(f"acc is not contiguous (stride {acc.strides[0]} bytes)")
    if not acc.flags.writeable:
        raise ValueError("acc is read-only")
    if not acc.flags.aligned:
        raise ValueError("acc is not aligned to 8 bytes")


def _check_weight(weight: float) -> float:
    w = float(weight)
    if not math.isfinite(w) or w < 0.0:
        raise ValueError(f"weight must be finite and >= 0; got {weight!r}")
    return w


def _check_tensor(t: Tensor, codec: str) -> None:
    """The fields every codec shares: the right codec, dtype float32, a range inside the shape."""
    if not isinstance(t, Tensor):
        raise TypeError(f"expected a fedmq.wire.Tensor, not {type(t).__name__}")
    if t.codec != codec:
        raise ValueError(f"tensor {t.name!r} has codec {t.codec!r}; this is the {codec} kernel")
    if t.dtype != "float32":
        raise ValueError(f"tensor {t.name!r} has dtype {t.dtype!r}; expected 'float32'")
    if t.offset < 0 or t.span < 0 or t.offset + t.span > t.size:
        raise ValueError(f"tensor {t.name!r}: range [{t.offset}, {t.offset + t.span}) is outside "
                         f"its {t.size} elements")


def _check_segment(acc: F64, t: Tensor) -> None:
    _check_acc(acc)
    if acc.size != t.span:
        raise ValueError(f"acc has {acc.size} elements; tensor {t.name!r} covers {t.span} "
                         f"([{t.offset}, {t.offset + t.span}))")


def _count(a: npt.NDArray[Any], n: int, what: str, unit: str, name: str) -> None:
    if a.size != n:
        raise ValueError(f"tensor {name!r}: {what} holds {a.size} {unit} values; expected {n}")


def _no_scales(t: Tensor, what: str) -> None:
    if t.block or len(t.scales):
        raise ValueError(f"tensor {t.name!r}: block and scales are only for int8 values, not "
                         f"{what}")


def _int8_parts(t: Tensor, n: int) -> tuple[I8, F32, int]:
    """The int8 values and scales of ``n`` values in blocks of ``t.block``."""
    if isinstance(t.block, bool) or not isinstance(t.block, int) or t.block < 1:
        raise ValueError(f"tensor {t.name!r}: int8 values need a block size >= 1; got "
                         f"{t.block!r}")
    q = _as_wire(t.data, "i1", "data", t.name)
    _count(q, n, "data", "int8", t.name)
    scales = _as_wire(t.scales, "<f4", "scales", t.name)
    _count(scales, blocks(n, t.block), "scales", "float32", t.name)
    return q, scales, t.block


def _fp32_parts(t: Tensor) -> F32:
    _check_tensor(t, "fp32")
    _no_scales(t, "fp32")
    x = _as_wire(t.data, "<f4", "data", t.name)
    _count(x, t.span, "data", "float32", t.name)
    return x


def _fp16_parts(t: Tensor) -> U16:
    _check_tensor(t, "fp16")
    _no_scales(t, "fp16")
    h = _as_wire(t.data, "<u2", "data", t.name)
    _count(h, t.span, "data", "fp16", t.name)
    return h


def _int8_tensor_parts(t: Tensor) -> tuple[I8, F32, int]:
    _check_tensor(t, "int8")
    return _int8_parts(t, t.span)


class _TopK(NamedTuple):
    idx: U32
    values: npt.NDArray[Any]  # int8 or fp16 bits (uint16)
    scales: F32  # empty for fp16 values
    block: int  # 0 for fp16 values


def _topk_parts(t: Tensor) -> _TopK:
    _check_tensor(t, "topk")
    if t.values not in TOPK_VALUES:
        raise ValueError(f"tensor {t.name!r}: topk values {t.values!r} must be one of "
                         f"{', '.join(TOPK_VALUES)}")
    idx = _as_wire(t.indices, "<u4", "indices", t.name)
    k = idx.size
    if k > t.span:
        raise ValueError(f"tensor {t.name!r}: {k} indices for a range of {t.span} elements")
    if t.values == "int8":
        q, scales, block = _int8_parts(t, k)
        return _TopK(idx, q, scales, block)
    _no_scales(t, "fp16 values")
    h = _as_wire(t.data, "<u2", "data", t.name)
    _count(h, k, "data", "fp16", t.name)
    return _TopK(idx, h, np.zeros(0, np.float32), 0)


# ---------------------------------------------------------------- public wrappers: fp32


# ---------------------------------------------------------------- threads

#: Dense folds at least this long are split across ``fold_threads`` threads; below it the
#: hand-off costs more than the second core saves (measured on 2 cores: a second thread was slower
#: at 256K and 512K float32 elements, even at 1M, and 20-30% faster from 2M up).
PARALLEL_MIN = 1 << 21


class _FoldThreads:
    """The process-wide fold thread pool (one per process: kernels are shared code)."""

    def __init__(self) -> None:
        self.threads = 1
        self.pool: ThreadPoolExecutor | None = None

    def set(self, n: int) -> None:
        want = n or os.cpu_count() or 1
        if want != self.threads:
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            self.pool = (ThreadPoolExecutor(want - 1, thread_name_prefix="fold") if want > 1
                         else None)
            self.threads = want


_FOLD = _FoldThreads()


def set_fold_threads(n: int) -> None:
    """Fold dense tensors with ``n`` threads (the kernels release the GIL); 0 = every core.

    The aggregator passes ``[strategy] fold_threads`` (default 0, every core); until then, and in
    code that never calls this, folds use one thread. Tensors under ``PARALLEL_MIN`` elements
    always fold on the calling thread.
    """
    if n < 0:
        raise ValueError(f"fold threads must be >= 0 (0 = every core); got {n}")
    _FOLD.set(n)


def fold_threads() -> int:
    """How many threads a large dense fold uses."""
    return _FOLD.threads


def _pieces(n: int, align: int, parts: int) -> list[tuple[int, int]]:
    """Cut ``range(n)`` into ``parts`` contiguous pieces starting on multiples of ``align``."""
    step = -(-n // parts)
    step = -(-step // align) * align
    return [(a, min(a + step, n)) for a in range(0, n, step)]


#: Elements per piece of a threaded fold. Threads take pieces as they finish the last one, so a
#: thread that the OS runs less (the broker, another process) holds up the fold by one piece at
#: most instead of by its whole half.
PIECE = 1 << 20


def _split_fold(n: int, align: int, fold: Callable[[int, int], None]) -> None:
    """Run ``fold(start, stop)`` over pieces of ``range(n)``: in threads when it pays."""
    pool = _FOLD.pool
    if pool is None or n < PARALLEL_MIN:
        fold(0, n)
        return
    # next() on a shared iterator is atomic under the GIL: each piece is taken exactly once.
    pieces = iter(_pieces(n, align, max(_FOLD.threads, -(-n // PIECE))))

    def work() -> None:
        for a, b in pieces:
            fold(a, b)

    futures = [pool.submit(work) for _ in range(_FOLD.threads - 1)]
    work()  # the calling thread takes pieces too
    for f in futures:
        f.result()


def fold_fp32(acc: F64, t: Tensor, weight: float) -> None:
    """``acc += weight * float64(x)``, ``x`` the tensor's little-endian float32 values."""
    x = _fp32_parts(t)
    _check_segment(acc, t)
    w = _check_weight(weight)
    _split_fold(acc.size, 1, lambda a, b: _fold_fp32(acc[a:b], x[a:b], w))


def check_fp32(t: Tensor) -> bool:
    """True when ``t`` is well-formed and none of its values is NaN or ±inf."""
    _check_tensor(t, "fp32")  # a wrong codec is the caller's mistake: it raises
    try:
        x = _fp32_parts(t)
    except ValueError:
        return False
    return bool(_all_finite_fp32(x.view(np.uint32)))


def sq_norm_fp32(t: Tensor) -> float:
    """Sum of squares of the tensor's values, accumulated in float64."""
    return float(_sq_norm_fp32(_fp32_parts(t)))


def all_finite_fp32(data: Buffer) -> bool:
    """True when no value of ``data`` (raw little-endian float32, or a float32 array) is NaN/inf.

    The raw helper the strategies use on whole models; tensors go through ``check_fp32``.
    """
    return bool(_all_finite_fp32(_as_wire(data, "<f4", "data", "").view(np.uint32)))


# ---------------------------------------------------------------- public wrappers: fp16


def fold_fp16(acc: F64, t: Tensor, weight: float) -> None:
    """``acc += weight * float64(h)``, ``h`` the tensor's little-endian IEEE binary16 values."""
    h = _fp16_parts(t)
    _check_segment(acc, t)
    w = _check_weight(weight)
    _split_fold(acc.size, 1, lambda a, b: _fold_fp16(acc[a:b], h[a:b], w))


def check_fp16(t: Tensor) -> bool:
    """True when ``t`` is well-formed and none of its values is NaN or ±inf."""
    _check_tensor(t, "fp16")
    try:
        h = _fp16_parts(t)
    except ValueError:
        return False
    return bool(_all_finite_fp16(h))


def sq_norm_fp16(t: Tensor) -> float:
    """Sum of squares of the tensor's values, accumulated in float64."""
    return float(_sq_norm_fp16(_fp16_parts(t)))


# ---------------------------------------------------------------- public wrappers: int8


def fold_int8(acc: F64, t: Tensor, weight: float) -> None:
    """``acc += weight * float64(float32(q) * scale)`` per value, one scale per block."""
    q, scales, block = _int8_tensor_parts(t)
    _check_segment(acc, t)
    w = _check_weight(weight)
    # Pieces start on block boundaries so each keeps whole blocks and their scales.
    _split_fold(acc.size, block, lambda a, b: _fold_int8(
        acc[a:b], q[a:b], scales[a // block:-(-b // block)], block, w))


def check_int8(t: Tensor) -> bool:
    """True when ``t`` is well-formed, its scales are finite and no value overflows float32."""
    _check_tensor(t, "int8")
    try:
        q, scales, block = _int8_tensor_parts(t)
    except ValueError:
        return False
    return bool(_all_finite_int8(q, scales, block))


def sq_norm_int8(t: Tensor) -> float:
    """Sum of squares of the tensor's decoded values, accumulated in float64."""
    return float(_sq_norm_int8(*_int8_tensor_parts(t)))


# ---------------------------------------------------------------- public wrappers: topk


def fold_topk(acc: F64, t: Tensor, weight: float) -> None:
    """``acc[i] += weight * value`` at each of the tensor's k indices; nothing else is touched.

    The indices are checked (strictly increasing, below ``span``) before anything is added: a bad
    one raises ``ValueError`` and leaves ``acc`` unchanged.
    """
    p = _topk_parts(t)
    _check_segment(acc, t)
    w = _check_weight(weight)
    if t.values == "int8":
        bad = _fold_topk_int8(acc, p.idx, p.values, p.scales, p.block, w)
    else:
        bad = _fold_topk_fp16(acc, p.idx, p.values, w)
    if bad >= 0:
        prev = f" after {int(p.idx[bad - 1])}" if bad else ""
        raise ValueError(f"tensor {t.name!r}: topk index {bad} is {int(p.idx[bad])}{prev}; "
                         f"indices must be strictly increasing and below {t.span}")


def check_topk(t: Tensor) -> bool:
    """True when ``t`` is well-formed, its indices strictly increase below ``span`` and every
    kept value is finite."""
    _check_tensor(t, "topk")
    try:
        p = _topk_parts(t)
    except ValueError:
        return False
    if _first_bad_index(p.idx, t.span) >= 0:
        return False
    if t.values == "int8":
        return bool(_all_finite_int8(p.values, p.scales, p.block))
    return bool(_all_finite_fp16(p.values))


def sq_norm_topk(t: Tensor) -> float:
    """Sum of squares of the k kept values (the others are 0), accumulated in float64."""
    p = _topk_parts(t)
    if t.values == "int8":
        return float(_sq_norm_int8(p.values, p.scales, p.block))
    return float(_sq_norm_fp16(p.values))


# ---------------------------------------------------------------- dispatch


class CodecKernels(NamedTuple):
    """What a codec needs: fold into an accumulator segment, the check, the squared L2 norm."""

    fold: Callable[[F64, Tensor, float], None]
    check: Callable[[Tensor], bool]
    sq_norm: Callable[[Tensor], float]


KERNELS: Mapping[str, CodecKernels] = MappingProxyType({
    "fp32": CodecKernels(fold_fp32, check_fp32, sq_norm_fp32),
    "fp16": CodecKernels(fold_fp16, check_fp16, sq_norm_fp16),
    "int8": CodecKernels(fold_int8, check_int8, sq_norm_int8),
    "topk": CodecKernels(fold_topk, check_topk, sq_norm_topk),
})


#: Accumulator elements per cache block in ``fold_many`` (1 MiB of float64: fits in L2).
CACHE_BLOCK = 1 << 17


#: Updates folded together by one grouped kernel (``_fold_*_4``; a remainder of 2 or 3 uses
#: ``_fold_*_2`` and then a single fold).
GROUP = 4

class _Ranged(NamedTuple):
    """``fold(start, stop)`` adds a group to ``acc[start:stop]``; ``start`` and ``stop`` must be
    multiples of ``align`` (or ``stop`` the end of ``acc``): int8 folds whole scale blocks."""

    fold: Callable[[int, int], None]
    align: int


class _Dense(NamedTuple):
    """One dense tensor ready to fold: its codec, its wire arrays and its weight."""

    codec: str
    arrays: tuple[npt.NDArray[Any], ...]  # fp32 / fp16: (values,); int8: (values, scales)
    block: int
    w: float


def _dense(t: Tensor, w: float) -> _Dense | None:
    """``t`` checked and viewed as wire arrays; None for sparse codecs (topk)."""
    if t.codec == "fp32":
        return _Dense("fp32", (_fp32_parts(t),), 0, w)
    if t.codec == "fp16":
        return _Dense("fp16", (_fp16_parts(t),), 0, w)
    if t.codec == "int8":
        q, scales, block = _int8_tensor_parts(t)
        return _Dense("int8", (q, scales), block, w)
    return None


def _ranged(acc: F64, group: Sequence[_Dense]) -> _Ranged:
    """A step that adds every item of ``group`` (1, 2 or 4 of one codec) to a range of ``acc``,
    in order."""
    first = group[0]
    ws = [d.w for d in group]
    if first.codec in ("fp32", "fp16"):
        xs = [d.arrays[0] for d in group]
        kernels: dict[tuple[str, int], Callable[..., None]] = {
            ("fp32", 1): _fold_fp32, ("fp32", 2): _fold_fp32_2, ("fp32", 4): _fold_fp32_4,
            ("fp16", 1): _fold_fp16, ("fp16", 2): _fold_fp16_2, ("fp16", 4): _fold_fp16_4,
        }
        kernel = kernels[first.codec, len(group)]
        return _Ranged(lambda a, b: kernel(acc[a:b], *[x[a:b] for x in xs], *ws), 1)
    block = first.block
    qs = [d.arrays[0] for d in group]
    ss = [d.arrays[1] for d in group]
    int8_kernels: dict[int, Callable[..., None]] = {1: _fold_int8, 2: _fold_int8_2,
                                                    4: _fold_int8_4}
    int8 = int8_kernels[len(group)]

    def fold(a: int, b: int) -> None:
        lo, hi = a // block, -(-b // block)
        int8(acc[a:b], *[q[a:b] for q in qs], *[s[lo:hi] for s in ss], block, *ws)
    return _Ranged(fold, block)


def _groups(items: Sequence[_Dense]) -> list[list[_Dense]]:
    """Consecutive runs of one codec (and int8 block size) cut into groups of 4, 2 and 1."""
    runs: list[list[_Dense]] = []
    for d in items:
        last = runs[-1][-1] if runs else None
        if last is not None and (last.codec, last.block) == (d.codec, d.block):
            runs[-1].append(d)
        else:
            runs.append([d])
    out: list[list[_Dense]] = []
    for run in runs:
        i = 0
        while i < len(run):
            size = GROUP if len(run) - i >= GROUP else (2 if len(run) - i >= 2 else 1)
            out.append(run[i:i + size])
            i += size
    return out


def fold_many(acc: F64, items: Sequence[tuple[Tensor, float]]) -> None:
    """Fold several updates' tensors for the same ``acc`` range: the same result, bit for bit,
    as folding them one by one in order.

    Dense updates are folded four (or two) at a time by grouped kernels, which load and store
    each accumulator element once per group, and one cache block of the accumulator at a time,
    so a block is read from memory once for the whole batch. Sparse (topk) tensors touch too
    little of ``acc`` to gain and are folded on their own, in their place in the order.
    """
    _check_acc(acc)
    # Check everything first: a bad item raises before anything is folded.
    checked: list[tuple[Tensor, float, _Dense | None]] = []
    for t, weight in items:
        _check_segment(acc, t)
        w = _check_weight(weight)
        checked.append((t, w, _dense(t, w)))
    run: list[_Dense] = []
    for t, w, d in checked:
        if d is not None:
            run.append(d)
            continue
        # A sparse tensor: what came before it is folded first (every block), then it, so each
        # element still sees the additions in update order.
        _fold_blocked(acc, [_ranged(acc, g) for g in _groups(run)])
        run = []
        KERNELS[t.codec].fold(acc, t, w)
    _fold_blocked(acc, [_ranged(acc, g) for g in _groups(run)])


def _fold_blocked(acc: F64, steps: Sequence[_Ranged]) -> None:
    """Run every step over ``acc`` one cache block at a time (a single step: in one go).

    Every step covers the same cache blocks, whose edges are multiples of every step's
    alignment: if an int8 step's blocks crossed the edges differently from the others', some
    elements would get its addition after a later step's and the sums would round differently.
    """
    align = math.lcm(1, *(step.align for step in steps))
    size = CACHE_BLOCK - CACHE_BLOCK % align
    if len(steps) == 1 or size == 0:  # one step, or int8 blocks too large to share cache blocks
        for step in steps:
            step.fold(0, acc.size)
        return
    for a in range(0, acc.size, size):
        for step in steps:
            step.fold(a, min(a + size, acc.size))


def _warmup_tensors() -> list[Tensor]:
    x = np.linspace(-1.0, 1.0, 8, dtype=np.float32)
    return [
        encode("fp32", x, "fp32"),
        encode("fp16", x, "fp16"),
        encode("int8", x, "int8", block=4),
        encode("topk-int8", x, "topk", fraction=0.5, values="int8", block=2),
        encode("topk-fp16", x, "topk", fraction=0.5, values="fp16"),
    ]


def warmup() -> None:
    """Compile (or load from the cache) every kernel for the types the wrappers pass at run time.

    Call once at start-up so the first round does not pay for compilation. Tensors carry bytes,
    which give read-only arrays; writable buffers are made read-only by the wrappers, so these
    calls cover every specialization a round can hit.
    """
    t0 = time.perf_counter()
    acc = np.zeros(8, dtype=np.float64)
    for t in _warmup_tensors():
        k = KERNELS[t.codec]
        k.fold(acc, t, 1.0)
        k.check(t)
        k.sq_norm(t)
        if t.codec != "topk":  # the grouped kernels, 4 and 2 at a time
            fold_many(acc, [(t, 1.0)] * (GROUP + 2))
    all_finite_fp32(bytes(32))
    log.debug("numba kernels ready in %.3f s", time.perf_counter() - t0)
