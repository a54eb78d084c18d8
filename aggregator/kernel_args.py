"""Argument checks and array views for the kernels: every wrapper in ``aggregator.kernels`` turns a
tensor's fields into the one kind of array its kernel is compiled for (1-D, C-contiguous,
aligned, read-only, native byte order) and says what was wrong when it cannot. No numba here.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from fedmq.wire import TOPK_VALUES, Tensor, blocks

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
I8 = npt.NDArray[np.int8]
U16 = npt.NDArray[np.uint16]
U32 = npt.NDArray[np.uint32]
#: What encoded bytes may arrive as: bytes, or an array over them.
Buffer = bytes | bytearray | memoryview | npt.NDArray[Any]


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
