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

The kernels themselves live by what they do: ``kernel_batch`` (dense folds, one update or a
group, and the cache-blocked plan of ``fold_many``), ``kernel_scans`` (finiteness, squared
norms), ``kernel_jit`` (the JIT wrapper, binary16 conversion, the topk index check) and
``kernel_args`` (argument checks and array views, no numba). This module holds the topk folds,
the public wrappers, the fold threads, the dispatch table and ``warmup``.

The codecs are specified in docs/protocol.md ("Codecs"); ``fedmq.compression`` holds the
encoders and the reference decoder. ``fp16`` is decoded from its uint16 bits (numba has no float16
type on the CPU): with the hardware conversion where the CPU has one (``fpext half``: F16C on x86,
AArch64), else by splitting sign, exponent and mantissa and rebuilding the value exactly in
float64, subnormals, infinities and NaN included. Both are exact: the same values as numpy's cast.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from aggregator.kernel_args import (
    F32,
    F64,
    I8,
    U16,
    U32,
    Buffer,
    _as_wire,
    _check_acc,
    _check_segment,
    _check_tensor,
    _check_weight,
    _fp16_parts,
    _fp32_parts,
    _int8_tensor_parts,
    _topk_parts,
)
from aggregator.kernel_batch import (
    GROUP,
    _Dense,
    _dense,
    _fold_blocked,
    _fold_fp16,
    _fold_fp32,
    _fold_int8,
    _groups,
    _ranged,
)
from aggregator.kernel_jit import _first_bad_index, _half, _jit
from aggregator.kernel_scans import (
    _all_finite_fp16,
    _all_finite_fp32,
    _all_finite_int8,
    _sq_norm_fp16,
    _sq_norm_fp32,
    _sq_norm_int8,
)
from fedmq.compression import encode
from fedmq.wire import Tensor

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

# ---------------------------------------------------------------- kernels: topk fold


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
