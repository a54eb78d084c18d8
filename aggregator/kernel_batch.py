"""Dense fold kernels (fp32, fp16, int8), one update or a group of 2 or 4 at a time, and the
cache-blocked plan ``aggregator.kernels.fold_many`` runs them by.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from aggregator.kernel_args import (
    F32,
    F64,
    I8,
    U16,
    _fp16_parts,
    _fp32_parts,
    _int8_tensor_parts,
)
from aggregator.kernel_jit import _half, _jit
from fedmq.wire import Tensor


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
