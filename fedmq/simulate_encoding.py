"""The update tensors of ``fedmq simulate``: a few random deltas per model, encoded once in the
announced codec, so that a simulated device sends a valid update without training."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt

from fedmq import compression
from fedmq.wire import CODECS, TOPK_VALUES, GlobalModel, RoundAnnouncement, Tensor

F32 = npt.NDArray[np.float32]

__all__ = ["Shapes", "codec_options", "encode_variants", "encoder", "model_shapes"]


def codec_options(params: Mapping[str, float | int | str]) -> dict[str, int | float | str]:
    """The encoder keyword arguments an announcement's ``codec_params`` name (as a real agent
    reads them, ``device_agent.update_encoding.codec_options``)."""
    opts: dict[str, int | float | str] = {}
    if isinstance(params.get("block"), int):
        opts["block"] = params["block"]
    fraction = params.get("fraction")
    if isinstance(fraction, int | float):
        opts["fraction"] = float(fraction)
    values = params.get("values")
    if isinstance(values, str) and values in TOPK_VALUES:
        opts["values"] = values
    return opts


def encoder(ann: RoundAnnouncement) -> Callable[[str, F32], Tensor]:
    """``encode(name, flat_range)`` in the announced codec (for ``chunking.split_update``)."""
    name_ = ann.codec if ann.codec in CODECS else "fp32"
    opts = codec_options(ann.codec_params)

    def encode(name: str, values: F32) -> Tensor:
        return compression.encode(name, values, name_, **opts)  # type: ignore[arg-type]

    return encode


Shapes = tuple[tuple[str, tuple[int, ...]], ...]


def model_shapes(model: GlobalModel) -> Shapes:
    """(name, shape) of a whole model's tensors, or of the tensor ranges in one part of a
    chunked model (each range carries its whole tensor's shape)."""
    seen: dict[str, tuple[int, ...]] = {}
    for t in model.tensors:
        seen.setdefault(t.name, tuple(t.shape))
    return tuple(seen.items())


def encode_variants(shapes: Shapes, codec_name: str,
                    params: Mapping[str, float | int | str], variants: int, seed: int
                    ) -> list[tuple[tuple[Tensor, ...], dict[str, F32]]]:
    """``variants`` random deltas (N(0, 0.01²) per element) of the model's ``shapes``, each with
    its encoded tensors."""
    opts = codec_options(params)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(variants):
        deltas = {name: (rng.standard_normal(shape) * 0.01).astype(np.float32)
                  for name, shape in shapes}
        tensors = tuple(compression.encode(name, d, codec_name, **opts)  # type: ignore[arg-type]
                        for name, d in deltas.items())
        out.append((tensors, deltas))
    return out

