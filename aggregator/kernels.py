"""Numba kernels that work directly on a tensor's encoded bytes, each behind a checked wrapper.

Every private ``_kernel`` is ``njit(**FLAGS)`` (see ``aggregator.kernel_config``) and trusts its
arguments; its public wrapper checks dtype, shape, contiguity and length and raises a
``ValueError`` that says what was wrong. Wrappers turn every input into one kind of array (1-D,
C-contiguous, aligned, read-only, native float32) so each kernel has a single specialization and
``warmup()`` compiles everything a round will use.

``KERNELS`` maps a codec name (``Tensor.codec``) to its ``(fold, all_finite, sq_norm)`` wrappers.
A new codec (fp16, block-wise int8, top-k) adds one entry whose kernels decode in the same pass;
the contract is the same: ``data`` is the tensor's encoded bytes and it decodes to
``acc.size`` values.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar, cast

import numpy as np
import numpy.typing as npt
from numba import njit

from aggregator.kernel_config import FLAGS, JitFlags

__all__ = [
    "KERNELS",
    "Buffer",
    "CodecKernels",
    "all_finite_fp32",
    "fold_fp32",
    "sq_norm_fp32",
    "warmup",
]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
#: What an encoded tensor may arrive as: its bytes, or an array over them.
Buffer = bytes | bytearray | memoryview | npt.NDArray[np.float32] | npt.NDArray[np.uint8]

_F = TypeVar("_F", bound=Callable[..., Any])

# Bit pattern of a float32 whose exponent is all ones: inf or NaN, whatever the sign and payload.
_EXP_MASK = np.uint32(0x7F800000)
# Elements checked between early exits: large enough to vectorize, small enough to stop soon.
_FINITE_BLOCK = 4096


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


# ---------------------------------------------------------------- kernels


@_jit
def _fold_fp32(acc: F64, x: F32, w: float) -> None:
    for i in range(acc.size):
        acc[i] += w * np.float64(x[i])


@_jit
def _all_finite_fp32(bits: npt.NDArray[np.uint32]) -> bool:
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
def _sq_norm_fp32(x: F32) -> float:
    # One serial float64 chain: without fastmath LLVM keeps it scalar anyway (split accumulators
    # measured no faster), and the fixed order gives the same bits on every machine.
    s = 0.0
    for i in range(x.size):
        v = np.float64(x[i])
        s += v * v
    return s


# ---------------------------------------------------------------- argument checks


def _as_fp32(data: Buffer) -> F32:
    """View ``data`` as the kernels' one array type; copies only unaligned or big-endian input."""
    if isinstance(data, np.ndarray):
        if data.dtype not in (np.float32, np.uint8):
            raise ValueError(
                f"data has dtype {data.dtype.str}; expected float32 (native byte order) or uint8 "
                "(raw little-endian float32 bytes)"
            )
        if not data.flags.c_contiguous:
            raise ValueError(
                f"data is not C-contiguous (shape {data.shape}, strides {data.strides})"
            )
        if data.dtype == np.uint8 and data.size % 4:
            raise ValueError(f"data has {data.size} bytes, not a whole number of float32 values")
        # uint8 holds the wire bytes (little-endian); a float32 array holds values (native order).
        a: F32 = data.reshape(-1).view(np.float32 if data.dtype == np.float32 else "<f4")
    else:
        try:
            mv = memoryview(data)
        except TypeError:
            raise TypeError(
                f"data must be bytes, a memoryview or a numpy array, not {type(data).__name__}"
            ) from None
        if not mv.c_contiguous:
            raise ValueError("data buffer is not C-contiguous")
        if mv.nbytes % 4:
            raise ValueError(f"data has {mv.nbytes} bytes, not a whole number of float32 values")
        a = np.frombuffer(mv.cast("B"), dtype="<f4")
    if not a.dtype.isnative:
        a = a.astype(np.float32)  # big-endian hosts only
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
    if acc.dtype != np.float64:
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


# ---------------------------------------------------------------- public wrappers


def fold_fp32(acc: F64, data: Buffer, weight: float) -> None:
    """``acc += weight * float64(x)`` in one pass, ``x`` being ``data`` as little-endian float32.

    Zero-copy for aligned input; ``data`` must decode to exactly ``acc.size`` values.
    """
    _check_acc(acc)
    w = _check_weight(weight)
    x = _as_fp32(data)
    if x.size != acc.size:
        raise ValueError(f"data holds {x.size} float32 values but acc has {acc.size}")
    _fold_fp32(acc, x, w)


def all_finite_fp32(data: Buffer) -> bool:
    """True when no value of ``data`` (little-endian float32) is NaN or ±inf."""
    return bool(_all_finite_fp32(_as_fp32(data).view(np.uint32)))


def sq_norm_fp32(data: Buffer) -> float:
    """Sum of squares of ``data`` (little-endian float32), accumulated in float64."""
    return float(_sq_norm_fp32(_as_fp32(data)))


class CodecKernels(NamedTuple):
    """The kernels a codec needs: fold into the accumulator, finiteness check, squared L2 norm."""

    fold: Callable[[F64, Buffer, float], None]
    all_finite: Callable[[Buffer], bool]
    sq_norm: Callable[[Buffer], float]


KERNELS: Mapping[str, CodecKernels] = MappingProxyType(
    {"fp32": CodecKernels(fold_fp32, all_finite_fp32, sq_norm_fp32)}
)


def warmup() -> None:
    """Compile (or load from the cache) every kernel for the types the wrappers pass at run time.

    Call once at start-up so the first round does not pay for compilation.
    """
    t0 = time.perf_counter()
    acc = np.zeros(8, dtype=np.float64)
    # bytes give read-only arrays; writable ones are made read-only by the wrappers, so these
    # calls cover every specialization a round can hit.
    for data in (bytes(32), np.ones(8, dtype=np.float32)):
        for k in KERNELS.values():
            k.fold(acc, data, 1.0)
            k.all_finite(data)
            k.sq_norm(data)
    log.debug("numba kernels ready in %.3f s", time.perf_counter() - t0)
