"""Tensor encoders and the reference decoder (numpy only: this runs on devices).

The aggregator never decodes through here on its hot path: it folds the encoded bytes with its
own kernels. Devices use ``encode`` for their updates and ``decode`` to load the global model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import numpy.typing as npt

from fedmq.wire import CODECS, Tensor

F32 = npt.NDArray[np.float32]


def encode(name: str, array: npt.ArrayLike, codec: str = "fp32") -> Tensor:
    """Encode one array with ``codec``."""
    if codec not in CODECS:
        raise ValueError(f"codec {codec!r} is not supported; choose one of {', '.join(CODECS)}")
    a = np.asarray(array, dtype="<f4")
    if not a.flags.c_contiguous:  # (np.ascontiguousarray would turn a 0-d array into 1-d)
        a = np.ascontiguousarray(a)
    return Tensor(name=name, dtype="float32", shape=tuple(int(d) for d in a.shape), codec=codec,
                  data=a.tobytes())


def decode(tensor: Tensor) -> F32:
    """Decode one tensor to a read-only float32 array (zero-copy for fp32)."""
    if tensor.codec != "fp32":
        raise ValueError(f"codec {tensor.codec!r} is not supported")
    a: F32 = np.frombuffer(tensor.data, dtype="<f4").reshape(tensor.shape)
    return a


def encode_all(weights: Mapping[str, npt.ArrayLike], codec: str = "fp32") -> tuple[Tensor, ...]:
    """Encode named arrays in their order."""
    return tuple(encode(name, a, codec) for name, a in weights.items())


def decode_all(tensors: Iterable[Tensor]) -> dict[str, F32]:
    """Decode tensors to a name → array dict, in order."""
    return {t.name: decode(t) for t in tensors}
