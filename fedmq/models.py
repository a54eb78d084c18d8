"""Model weights as plain named float32 tensors, and the built-in dense-chain (MLP) layout.

A model is a :data:`Weights` dict. Its insertion order is the tensor order on the wire, so every
function here builds and returns dicts in a fixed order. The built-in models are chains of dense
layers named ``dense0.weight`` (shape ``(in, out)``), ``dense0.bias`` (shape ``(out,)``),
``dense1.weight``, ... ``layer_sizes`` lists the widths: ``[64, 10]`` is softmax regression,
``[64, 64, 10]`` an MLP with one hidden layer.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_LAYER_SIZES",
    "Weights",
    "flatten",
    "init_mlp",
    "layer_sizes_of",
    "num_parameters",
    "unflatten",
]

# Upper bounds on training settings, shared by the aggregator's config check and the device's
# check of each announcement: a hostile or mistyped announcement must not make a device train
# for days.
MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 1 << 20
MAX_LR = 100.0
#: FedProx's mu: the literature uses 0.001 to 1; far above that the local model cannot move.
MAX_PROXIMAL_MU = 1000.0

Weights = dict[str, npt.NDArray[np.float32]]
"""Named float32 tensors; insertion order is the tensor order on the wire."""

DEFAULT_LAYER_SIZES: tuple[int, ...] = (64, 128, 10)
"""The built-in model for 8x8 digits (tuned with ``benchmarks/sim_fedavg.py``)."""

_NAME = re.compile(r"dense(\d+)\.(weight|bias)")


def init_mlp(layer_sizes: Sequence[int], seed: int) -> Weights:
    """Fresh weights for a chain of dense layers.

    Hidden layers (followed by ReLU) use He-normal init, the output layer (followed by softmax)
    Glorot-uniform; biases start at zero. Same ``(layer_sizes, seed)``, same weights.
    """
    sizes = [int(s) for s in layer_sizes]
    if len(sizes) < 2:
        raise ValueError(
            f"layer_sizes needs at least an input and an output size, got {list(layer_sizes)}"
        )
    if any(s < 1 for s in sizes):
        raise ValueError(f"every layer size must be >= 1, got {list(layer_sizes)}")
    rng = np.random.default_rng(seed)
    weights: Weights = {}
    last = len(sizes) - 2
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        if i < last:
            w = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_in, fan_out))
        else:
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            w = rng.uniform(-limit, limit, size=(fan_in, fan_out))
        weights[f"dense{i}.weight"] = w.astype(np.float32)
        weights[f"dense{i}.bias"] = np.zeros(fan_out, dtype=np.float32)
    return weights


def layer_sizes_of(weights: Mapping[str, npt.NDArray[Any]]) -> list[int]:
    """Infer ``layer_sizes`` back from dense-chain weights.

    Raises ``ValueError`` saying what is wrong if the tensors are not exactly
    ``dense0.weight, dense0.bias, dense1.weight, ...`` in that order with chained shapes.
    """
    names = list(weights)
    if not names or len(names) % 2:
        raise ValueError(
            f"expected pairs of dense{{i}}.weight / dense{{i}}.bias tensors, got {names}"
        )
    sizes: list[int] = []
    for i in range(len(names) // 2):
        expected = [f"dense{i}.weight", f"dense{i}.bias"]
        if names[2 * i : 2 * i + 2] != expected:
            bad = [n for n in names if not _NAME.fullmatch(n)]
            hint = f" (not dense-layer names: {bad})" if bad else ""
            raise ValueError(
                f"expected tensors {expected} at positions {2 * i}, {2 * i + 1}, "
                f"got {names[2 * i : 2 * i + 2]}{hint}"
            )
        w, b = weights[expected[0]], weights[expected[1]]
        if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
            raise ValueError(
                f"{expected[0]} must be a non-empty 2-D (in, out) matrix, got shape {w.shape}"
            )
        if b.shape != (w.shape[1],):
            raise ValueError(
                f"{expected[1]} must have shape ({w.shape[1]},) to match "
                f"{expected[0]} {w.shape}, got {b.shape}"
            )
        if sizes and w.shape[0] != sizes[-1]:
            raise ValueError(
                f"{expected[0]} takes {w.shape[0]} inputs but the previous layer "
                f"outputs {sizes[-1]}"
            )
        if not sizes:
            sizes.append(int(w.shape[0]))
        sizes.append(int(w.shape[1]))
    return sizes


def num_parameters(weights: Mapping[str, npt.NDArray[Any]]) -> int:
    """Total number of scalars in all tensors."""
    return sum(int(t.size) for t in weights.values())


def flatten(weights: Mapping[str, npt.NDArray[Any]]) -> npt.NDArray[np.float64]:
    """All tensors concatenated in wire order, as one float64 vector (for averaging and norms)."""
    if not weights:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(t, dtype=np.float64).ravel() for t in weights.values()])


def unflatten(vector: npt.ArrayLike, like: Mapping[str, npt.NDArray[Any]]) -> Weights:
    """Inverse of :func:`flatten`: float32 tensors named and shaped as ``like``."""
    flat = np.asarray(vector).ravel()
    total = num_parameters(like)
    if flat.size != total:
        raise ValueError(f"vector has {flat.size} values but the model has {total} parameters")
    out: Weights = {}
    start = 0
    for name, t in like.items():
        out[name] = flat[start : start + t.size].reshape(t.shape).astype(np.float32)
        start += t.size
    return out
