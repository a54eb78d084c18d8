"""Secure aggregation's fold: add a masked uint32 vector into the round's ring accumulator.

Masked inputs are integers mod 2^32 (``fedmq.secagg.fixedpoint``); the aggregator keeps their
running sum, one uint32 per parameter plus the weight element, and adds each input the moment it
arrives, so memory stays O(parameters) and no input is kept (after the add the accumulator holds
a sum of masked vectors, never one device's). The add wraps mod 2^32, which is the ring's
addition: the masks cancel in that ring, not in the integers.

``fold_masked(acc, data, offset)`` adds the little-endian uint32 values in ``data`` to
``acc[offset : offset + len]`` (a chunk of a masked input covers a range). Its private kernel is
``njit(**FLAGS)`` like every other; the wrapper checks the arguments and says what was wrong.
"""

from __future__ import annotations

import numpy as np

from aggregator.kernel_args import U32, Buffer, _as_wire
from aggregator.kernel_jit import _jit

__all__ = ["fold_masked", "warmup_masked"]


@_jit
def _fold_masked(acc: U32, x: U32, offset: int) -> None:
    # An array add, not an element loop: the same wrapping uint32 add compiled (vectorized) and
    # without the JIT (numpy warns on scalar overflow, not on arrays, so NUMBA_DISABLE_JIT=1 runs)
    a = acc[offset:offset + x.size]
    a += x


def fold_masked(acc: U32, data: Buffer, offset: int = 0) -> None:
    """``acc[offset:offset+n] += data`` mod 2^32, ``data`` holding ``n`` little-endian uint32."""
    if not isinstance(acc, np.ndarray):
        raise TypeError(f"acc must be a numpy array, not {type(acc).__name__}")
    if acc.dtype != np.uint32 or not acc.dtype.isnative or acc.ndim != 1:
        raise ValueError(f"acc must be a 1-D native uint32 array; got {acc.dtype.str} "
                         f"with {acc.ndim} dimensions")
    if not acc.flags.c_contiguous or not acc.flags.writeable:
        raise ValueError("acc must be C-contiguous and writeable")
    x = _as_wire(data, "<u4", "masked input", "")
    if offset < 0 or offset + x.size > acc.size:
        raise ValueError(f"masked input of {x.size} values at offset {offset} does not fit "
                         f"an accumulator of {acc.size}")
    _fold_masked(acc, x, int(offset))


def warmup_masked() -> None:
    """Compile the kernel (the first round should not pay for it)."""
    fold_masked(np.zeros(2, dtype=np.uint32), np.ones(1, dtype=np.uint32), 1)
