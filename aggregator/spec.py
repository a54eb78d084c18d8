"""The layout of a model as the aggregator sees it: named tensors packed into one flat vector.

A ``ModelSpec`` fixes the tensor names, their order and shapes, and where each one lives in the
flat float64 accumulator. ``check`` compares an update against it before anything is folded.
Pure data and numpy: no numba here.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from fedmq.wire import CODECS, Tensor

__all__ = ["ModelSpec"]

_S = TypeVar("_S", bound=np.generic)


@dataclass(frozen=True)
class ModelSpec:
    """Tensor names and shapes in order, each tensor's offset in the flat vector, and its length."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    total: int
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.names:
            raise ValueError("a model needs at least one tensor")
        if not len(self.names) == len(self.shapes) == len(self.offsets):
            raise ValueError("names, shapes and offsets must have the same length")
        index: dict[str, int] = {}
        offset = 0
        for i, (name, shape, off) in enumerate(zip(self.names, self.shapes, self.offsets,
                                                  strict=True)):
            if name in index:
                raise ValueError(f"tensor name {name!r} appears more than once")
            if any(d < 0 for d in shape):
                raise ValueError(f"tensor {name!r} has a negative dimension: {shape}")
            if off != offset:
                raise ValueError(f"tensor {name!r} has offset {off}; expected {offset}")
            index[name] = i
            offset += math.prod(shape)
        if self.total != offset:
            raise ValueError(f"total is {self.total}; the shapes add up to {offset}")
        object.__setattr__(self, "_index", index)

    @classmethod
    def _build(cls, pairs: Sequence[tuple[str, tuple[int, ...]]]) -> ModelSpec:
        offsets: list[int] = []
        total = 0
        for _, shape in pairs:
            offsets.append(total)
            total += math.prod(shape)
        return cls(
            names=tuple(n for n, _ in pairs),
            shapes=tuple(s for _, s in pairs),
            offsets=tuple(offsets),
            total=total,
        )

    @classmethod
    def from_weights(cls, weights: Mapping[str, npt.NDArray[Any]]) -> ModelSpec:
        """The spec of named arrays, in the mapping's order."""
        return cls._build([(n, tuple(int(d) for d in np.shape(a))) for n, a in weights.items()])

    @classmethod
    def from_tensors(cls, tensors: Sequence[Tensor]) -> ModelSpec:
        """The spec of encoded tensors (e.g. a ``GlobalModel``'s), in their order."""
        return cls._build([(t.name, tuple(int(d) for d in t.shape)) for t in tensors])

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of elements of each tensor."""
        return tuple(math.prod(s) for s in self.shapes)

    def index(self, name: str) -> int:
        """Position of tensor ``name``; ``KeyError`` if the model has none."""
        return self._index[name]

    def slices(self) -> dict[str, slice]:
        """Each tensor's slice of the flat vector, in order."""
        return {
            name: slice(off, off + size)
            for name, off, size in zip(self.names, self.offsets, self.sizes, strict=True)
        }

    def split(self, flat: npt.NDArray[_S]) -> dict[str, npt.NDArray[_S]]:
        """Views of ``flat`` (shape ``(total,)``) reshaped per tensor, in order."""
        if flat.shape != (self.total,):
            raise ValueError(f"flat vector has shape {flat.shape}; expected ({self.total},)")
        return {
            name: flat[sl].reshape(shape)
            for (name, sl), shape in zip(self.slices().items(), self.shapes, strict=True)
        }

    def check_ranges(self, tensors: Sequence[Tensor],
                     codecs: Collection[str] = CODECS) -> str | None:
        """None if every tensor range is a known tensor with its shape, else a reason.

        A chunk carries ranges of some tensors; each tensor at most once per chunk.
        """
        return self._check(tensors, codecs, whole=False)

    def check(self, tensors: Sequence[Tensor], codecs: Collection[str] = CODECS) -> str | None:
        """None if ``tensors`` match the model exactly, else a short reason it does not.

        Every tensor must appear once (in any order) with its shape, dtype float32, a codec in
        ``codecs``, covering the whole tensor (byte lengths were checked by the decoder).
        """
        return self._check(tensors, codecs, whole=True)

    def _check(self, tensors: Sequence[Tensor], codecs: Collection[str],
               whole: bool) -> str | None:
        seen: set[str] = set()
        for t in tensors:
            i = self._index.get(t.name)
            if i is None:
                return f"unexpected tensor {t.name!r}"
            if t.name in seen:
                return f"tensor {t.name!r} appears more than once"
            seen.add(t.name)
            shape = tuple(t.shape)
            if shape != self.shapes[i]:
                return f"tensor {t.name!r} has shape {shape}; the model has {self.shapes[i]}"
            if t.dtype != "float32":
                return f"tensor {t.name!r} has dtype {t.dtype!r}; expected 'float32'"
            if t.codec not in codecs:
                return (f"tensor {t.name!r} uses codec {t.codec!r}; allowed: "
                        f"{', '.join(sorted(codecs))}")
            size = math.prod(shape)
            if (t.offset != 0 or t.span != size) if whole else t.offset + t.span > size:
                return (f"tensor {t.name!r} covers elements [{t.offset}, {t.offset + t.span}) "
                        f"of {size}")
        if not whole:
            return None
        if len(seen) != len(self.names):
            missing = [n for n in self.names if n not in seen]
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            noun = "tensor" if len(missing) == 1 else "tensors"
            return f"missing {noun} {', '.join(map(repr, missing[:3]))}{more}"
        return None
