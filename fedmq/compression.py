"""Tensor encoders, the reference decoders and error feedback (numpy only: this runs on devices).

The codecs and their byte layouts are specified in docs/protocol.md ("Codecs"):

``fp32``
    the values as little-endian float32: lossless.
``fp16``
    little-endian IEEE binary16; finite values beyond ±65504 saturate to ±65504.
``int8``
    one int8 per value and one little-endian float32 scale per block of ``block`` values (the
    last block may be short): ``value = float32(q) * scale``, rounded once to float32. The encoder
    takes ``scale = absmax / 127`` per block (0 for an all-zero block), rounds to nearest (ties to
    even) and clips to [-127, 127], so each value is off by at most ``scale / 2`` (plus float32
    rounding of the product).
``topk``
    the ``k = max(1, round(fraction * span))`` values of largest magnitude: their positions as
    strictly increasing little-endian uint32 ``indices`` (relative to ``offset``) and their values
    as ``int8`` (block-wise over the k values, exactly like the int8 codec) or ``fp16``; every other
    position decodes to 0.

The aggregator never decodes through here on its hot path: it folds the encoded bytes with its own
kernels (``aggregator.kernels``), which are tested against ``decode_range``. Devices use
``encode`` / ``encode_with_feedback`` for their updates and ``decode`` to load the global model.

Lossy codecs lose a little of every update; ``ErrorFeedback`` keeps what was lost on the device and
adds it to the next update, so nothing is lost for good (Seide et al. 2014, Lin et al. 2018: top-k
with error feedback converges at SGD's rate).
"""

from __future__ import annotations

import logging
import math
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

from fedmq.durable import atomic_write
from fedmq.wire import CODECS, TOPK_VALUES, Blob, Tensor, blocks

__all__ = [
    "DEFAULT_BLOCK",
    "DEFAULT_FRACTION",
    "FP16_MAX",
    "ErrorFeedback",
    "decode",
    "decode_all",
    "decode_range",
    "dequantize",
    "encode",
    "encode_all",
    "encode_with_feedback",
    "quantize",
]

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]
Weights = dict[str, F32]

#: Values per int8 scale unless the round announcement says otherwise.
DEFAULT_BLOCK = 256
#: Share of a tensor's entries that ``topk`` keeps by default (1%).
DEFAULT_FRACTION = 0.01
#: Largest finite IEEE binary16 value; fp16 encoding saturates there.
FP16_MAX = 65504.0
#: Largest block size the decoder accepts (``fedmq.codec``).
MAX_BLOCK = 1 << 24

_ITEMSIZE = {"fp32": 4, "fp16": 2, "int8": 1}
_TINY = np.float32(np.finfo(np.float32).smallest_subnormal)


# ---------------------------------------------------------------- encoding


def _check_options(codec: str, block: int, fraction: float, values: str) -> None:
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not supported; choose one of {', '.join(CODECS)}")
    if isinstance(block, bool) or not isinstance(block, int | np.integer) or not (
            1 <= block <= MAX_BLOCK):
        raise ValueError(f"block must be an integer in [1, {MAX_BLOCK}]; got {block!r}")
    if not (isinstance(fraction, int | float | np.floating) and math.isfinite(fraction)
            and 0.0 < fraction <= 1.0):
        raise ValueError(f"fraction must be in (0, 1]; got {fraction!r}")
    if values not in TOPK_VALUES:
        raise ValueError(f"topk values must be one of {', '.join(TOPK_VALUES)}; got {values!r}")


def _fp16_bytes(x: F32) -> bytes:
    """IEEE binary16, little-endian; finite values saturate at ±65504, NaN and ±inf stay."""
    y = np.where(np.isinf(x), x, np.clip(x, -FP16_MAX, FP16_MAX))
    with np.errstate(invalid="ignore"):  # NaN casts quietly (and stays NaN)
        return y.astype("<f2").tobytes()


def quantize(x: npt.ArrayLike, block: int = DEFAULT_BLOCK) -> tuple[bytes, bytes]:
    """Block-wise absmax int8 quantization of a 1-D array: ``(int8 bytes, float32 scale bytes)``.

    One scale per ``block`` values (``blocks(n, block)`` of them, the last block may be short):
    ``scale = absmax / 127`` rounded to float32, 0 for an all-zero block; ``q = rint(x / scale)``
    clipped to [-127, 127]. Two float32 edge cases are handled so every finite input decodes to
    finite values within ``scale / 2``: a scale that would underflow to 0 for a non-zero block is
    the smallest subnormal instead, and one whose ``127 * scale`` would overflow is nudged down.
    Raises ``ValueError`` on NaN or inf: they have no int8 representation.
    """
    v = np.asarray(x, dtype=np.float32).reshape(-1)
    if not bool(np.isfinite(v).all()):
        raise ValueError("int8 quantization needs finite values; the array has NaN or inf")
    n = v.size
    nb = blocks(n, block)
    padded = np.zeros(nb * block, dtype=np.float64)
    padded[:n] = v
    xb = padded.reshape(nb, block)
    absmax = np.abs(xb).max(axis=1, initial=0.0)
    scales = (absmax / 127.0).astype(np.float32)
    scales[(scales == 0) & (absmax > 0)] = _TINY
    with np.errstate(over="ignore"):
        overflow = ~np.isfinite(np.float32(127) * scales)
    scales[overflow] = np.nextafter(scales[overflow], np.float32(0))
    safe = np.where(scales > 0, scales, np.float32(1)).astype(np.float64)
    q = np.clip(np.rint(xb / safe[:, None]), -127, 127).astype(np.int8).reshape(-1)[:n]
    return q.tobytes(), scales.astype("<f4").tobytes()


def encode(
    name: str,
    array: npt.ArrayLike,
    codec: str = "fp32",
    *,
    block: int = DEFAULT_BLOCK,
    fraction: float = DEFAULT_FRACTION,
    values: str = "int8",
    offset: int = 0,
    count: int | None = None,
) -> Tensor:
    """Encode one array (or the range ``[offset, offset + count)`` of it, flattened) with ``codec``.

    ``block`` is the int8 scale block (``int8``, and ``topk`` with int8 values); ``fraction`` the
    share of entries ``topk`` keeps and ``values`` how it encodes them (``"int8"`` or
    ``"fp16"``). The tensor's ``shape`` is always the whole array's. Options a codec does not use
    are ignored (but still checked).
    """
    _check_options(codec, block, fraction, values)
    a = np.asarray(array, dtype="<f4")
    if not a.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
        a = np.ascontiguousarray(a)
    shape = tuple(int(d) for d in a.shape)
    flat = a.reshape(-1)
    if not 0 <= offset <= flat.size:
        raise ValueError(f"offset {offset} is outside the array's {flat.size} elements")
    span = flat.size - offset if count is None else count
    if span < 0 or offset + span > flat.size:
        raise ValueError(f"range [{offset}, {offset + span}) is outside the array's "
                         f"{flat.size} elements")
    x = flat[offset:offset + span]
    cnt = None if offset == 0 and span == flat.size else span  # normalised like fedmq.codec

    def make(data: bytes, block: int = 0, scales: bytes = b"", indices: bytes = b"",
             kept_as: str = "") -> Tensor:
        return Tensor(name=name, dtype="float32", shape=shape, codec=codec, data=data,
                      offset=offset, count=cnt, block=block, scales=scales, indices=indices,
                      values=kept_as)

    if codec == "fp32":
        return make(x.tobytes())
    if codec == "fp16":
        return make(_fp16_bytes(x))
    if codec == "int8":
        q, scales = quantize(x, block)
        return make(q, block, scales)
    # topk
    if span >= 1 << 32:
        raise ValueError(f"topk indices are uint32: a range of {span} elements is too long")
    k = min(span, max(1, round(fraction * span))) if span else 0
    # argpartition puts the k largest magnitudes last (NaN counts as largest: it is kept and seen).
    idx = np.sort(np.argpartition(np.abs(x), span - k)[span - k:]) if k else np.zeros(0, np.intp)
    kept = x[idx]
    indices = idx.astype("<u4").tobytes()
    if values == "fp16":
        return make(_fp16_bytes(kept), indices=indices, kept_as="fp16")
    q, scales = quantize(kept, block)
    return make(q, block, scales, indices, "int8")


def encode_all(
    weights: Mapping[str, npt.ArrayLike],
    codec: str = "fp32",
    *,
    block: int = DEFAULT_BLOCK,
    fraction: float = DEFAULT_FRACTION,
    values: str = "int8",
) -> tuple[Tensor, ...]:
    """Encode named arrays in their order (whole tensors)."""
    return tuple(encode(name, a, codec, block=block, fraction=fraction, values=values)
                 for name, a in weights.items())


def encode_with_feedback(
    weights: Mapping[str, npt.ArrayLike],
    codec: str,
    feedback: ErrorFeedback | None,
    *,
    block: int = DEFAULT_BLOCK,
    fraction: float = DEFAULT_FRACTION,
    values: str = "int8",
) -> tuple[Tensor, ...]:
    """``encode_all`` with error feedback: encode ``weights + residual``, keep what was lost.

    The residual is updated in memory; call ``feedback.save()`` once the update has been handed
    to the broker so a restart keeps it. With ``feedback`` None this is ``encode_all``.
    """
    if feedback is None:
        return encode_all(weights, codec, block=block, fraction=fraction, values=values)
    intended = feedback.compensate(weights)
    tensors = encode_all(intended, codec, block=block, fraction=fraction, values=values)
    feedback.record({t.name: decode(t) for t in tensors}, intended)
    return tensors


# ---------------------------------------------------------------- decoding


def _half_to_float(data: Blob) -> F32:
    with np.errstate(invalid="ignore"):  # numpy warns when casting a NaN; it stays NaN
        return np.frombuffer(data, dtype="<f2").astype(np.float32)


def _layout(t: Tensor) -> None:
    """Raise ``ValueError`` unless ``t``'s fields and byte lengths are consistent."""
    if t.codec not in CODECS:
        raise ValueError(f"tensor {t.name!r}: codec {t.codec!r} is not supported")
    if t.dtype != "float32":
        raise ValueError(f"tensor {t.name!r}: dtype {t.dtype!r} is not supported (float32)")
    size, span = t.size, t.span
    if t.offset < 0 or span < 0 or t.offset + span > size:
        raise ValueError(f"tensor {t.name!r}: range [{t.offset}, {t.offset + span}) is outside "
                         f"its {size} elements")
    nnz = span
    value_codec = t.codec
    if t.codec == "topk":
        if t.values not in TOPK_VALUES:
            raise ValueError(f"tensor {t.name!r}: topk values {t.values!r} must be one of "
                             f"{', '.join(TOPK_VALUES)}")
        if len(t.indices) % 4 or len(t.indices) // 4 > span:
            raise ValueError(f"tensor {t.name!r}: {len(t.indices)} index bytes is not a whole "
                             f"number of uint32 at most {span}")
        nnz = len(t.indices) // 4
        value_codec = t.values
    elif t.indices:
        raise ValueError(f"tensor {t.name!r}: indices are only allowed with codec topk")
    need = nnz * _ITEMSIZE[value_codec]
    if len(t.data) != need:
        raise ValueError(f"tensor {t.name!r}: {len(t.data)} data bytes; {nnz} {value_codec} "
                         f"values need {need}")
    if value_codec == "int8":
        if not 1 <= t.block <= MAX_BLOCK:
            raise ValueError(f"tensor {t.name!r}: int8 values need a block size in "
                             f"[1, {MAX_BLOCK}], got {t.block}")
        if len(t.scales) != 4 * blocks(nnz, t.block):
            raise ValueError(f"tensor {t.name!r}: {len(t.scales)} scale bytes; {nnz} values in "
                             f"blocks of {t.block} need {4 * blocks(nnz, t.block)}")
    elif t.block or t.scales:
        raise ValueError(f"tensor {t.name!r}: block and scales are only for int8 values")


def dequantize(data: Blob, scales: Blob, block: int) -> F32:
    """int8 values times their block's float32 scale, each product rounded to float32."""
    q = np.frombuffer(data, dtype=np.int8)
    s = np.frombuffer(scales, dtype="<f4").astype(np.float32)
    n = q.size
    full = n // block
    out = np.empty(n, dtype=np.float32)
    out[:full * block] = (q[:full * block].reshape(full, block).astype(np.float32)
                          * s[:full, None]).reshape(-1)
    if full * block < n:
        out[full * block:] = q[full * block:].astype(np.float32) * s[full]
    return out


def decode_range(tensor: Tensor) -> F32:
    """The reference decoder: the ``span`` values a tensor carries, as 1-D float32.

    Raises ``ValueError`` when the tensor is inconsistent (byte lengths, block, scales) or, for
    ``topk``, when its indices are not strictly increasing or not below ``span``. Zero-copy and
    read-only for fp32; a new array otherwise.
    """
    t = tensor
    _layout(t)
    if t.codec == "fp32":
        x: F32 = np.frombuffer(t.data, dtype="<f4").astype(np.float32, copy=False)
        return x
    if t.codec == "fp16":
        return _half_to_float(t.data)
    if t.codec == "int8":
        return dequantize(t.data, t.scales, t.block)
    idx = np.frombuffer(t.indices, dtype="<u4").astype(np.int64)
    if idx.size and (idx[-1] >= t.span or bool((np.diff(idx) <= 0).any())):
        raise ValueError(f"tensor {t.name!r}: topk indices must be strictly increasing and "
                         f"below {t.span}")
    out = np.zeros(t.span, dtype=np.float32)
    if t.values == "fp16":
        out[idx] = _half_to_float(t.data)
    else:
        out[idx] = dequantize(t.data, t.scales, t.block)
    return out


def decode(tensor: Tensor) -> F32:
    """Decode a whole tensor to a float32 array of its shape (read-only, zero-copy for fp32).

    A tensor that carries only a range of its elements raises ``ValueError``: use
    ``decode_range`` for those.
    """
    if tensor.offset != 0 or tensor.span != tensor.size:
        raise ValueError(f"tensor {tensor.name!r} carries elements [{tensor.offset}, "
                         f"{tensor.offset + tensor.span}) of {tensor.size}; use decode_range")
    a = decode_range(tensor).reshape(tensor.shape)
    a.flags.writeable = False
    return a


def decode_all(tensors: Iterable[Tensor]) -> dict[str, F32]:
    """Decode whole tensors to a name → array dict, in order."""
    return {t.name: decode(t) for t in tensors}


# ---------------------------------------------------------------- error feedback


class ErrorFeedback:
    """Device-side residual memory for lossy codecs (error feedback / error compensation).

    Each round: ``intended = compensate(delta)`` (the new delta plus what earlier rounds failed to
    send), encode ``intended``, then ``record(sent, intended)`` with ``sent`` what the aggregator
    will decode from the encoded update; the difference is carried to the next round. Over many
    rounds the sum of what was sent tracks the sum of the deltas, off by only the current residual.

    With a ``path`` the residual is loaded from that ``.npz`` file at construction (a missing or
    unreadable file starts empty, with a warning for the latter) and ``save()`` writes it
    atomically, so a device restart keeps it. Residuals are float32, one per tensor name; one whose
    shape no longer matches the delta (the model changed) is dropped.
    """

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._residual: dict[str, F32] = {}
        if self.path is not None:
            self._load(self.path)

    @property
    def residual(self) -> Mapping[str, F32]:
        """The carried residual by tensor name (a read-only view)."""
        return MappingProxyType(self._residual)

    def compensate(self, delta: Mapping[str, npt.ArrayLike]) -> Weights:
        """``delta + residual`` per tensor, as new float32 arrays (``delta`` is not modified)."""
        out: Weights = {}
        for name, d in delta.items():
            a = np.array(d, dtype=np.float32)  # a copy: the caller's arrays stay theirs
            r = self._residual.get(name)
            if r is not None and r.shape != a.shape:
                log.warning("error feedback: dropping the residual of %r: shape %s, the delta "
                            "has %s", name, r.shape, a.shape)
                del self._residual[name]
            elif r is not None:
                a += r
            out[name] = a
        return out

    def record(self, sent: Mapping[str, npt.ArrayLike],
               intended: Mapping[str, npt.ArrayLike]) -> None:
        """Keep ``intended - sent`` per tensor as the residual for the next round.

        ``intended`` is what ``compensate`` returned, ``sent`` what the encoded update decodes to;
        both must name the same tensors with the same shapes. Non-finite residual values (a
        diverged delta) are zeroed rather than carried into every later round.
        """
        if set(sent) != set(intended):
            raise ValueError(f"sent has tensors {sorted(sent)}; intended has {sorted(intended)}")
        new: Weights = {}
        for name, i in intended.items():
            want = np.asarray(i, dtype=np.float32)
            got = np.asarray(sent[name], dtype=np.float32)
            if want.shape != got.shape:
                raise ValueError(f"tensor {name!r}: sent has shape {got.shape}, intended "
                                 f"{want.shape}")
            with np.errstate(invalid="ignore", over="ignore"):
                r = want - got
            bad = ~np.isfinite(r)
            if bad.any():
                log.warning("error feedback: %d non-finite residual values of %r zeroed",
                            int(bad.sum()), name)
                r[bad] = 0.0
            new[name] = r
        self._residual.update(new)

    def reset(self) -> None:
        """Forget the residual, in memory and on disk."""
        self._residual.clear()
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def save(self) -> None:
        """Write the residual to ``path`` atomically (a temporary file, fsync, ``os.replace``)."""
        if self.path is None:
            return
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        names = list(self._residual)
        arrays = {f"r{i}": self._residual[n] for i, n in enumerate(names)}
        # Names go in an array, not in the zip member names: any UTF-8 text is allowed.
        atomic_write(path, lambda f: np.savez(
            f, names=np.array(names, dtype=np.str_), **arrays))  # type: ignore[arg-type]

    def _load(self, path: Path) -> None:
        if not path.exists():
            return
        try:
            with np.load(path, allow_pickle=False) as z:
                names = [str(n) for n in z["names"]]
                residual = {n: np.asarray(z[f"r{i}"], dtype=np.float32)
                            for i, n in enumerate(names)}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("error feedback: cannot read %s (%s); starting with no residual", path,
                        exc)
            return
        self._residual = residual


