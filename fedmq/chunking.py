"""Splitting messages that exceed a broker's packet limit, and putting models back together.

Pure and numpy-only (devices use it). Brokers cap packets (EMQX 1 MB, AWS IoT Core 128 KB,
Mosquitto's ``max_packet_size``), so:

- an update is cut along the flattened parameter space into ``chunks`` messages, each with the
  full header and tensor *ranges* (``Tensor.offset`` / ``count``), each encoded on its own (an
  int8 range has its own block scales, a top-k range keeps its own top fraction). The aggregator
  folds each chunk as it arrives (docs/protocol.md, "Chunked updates").
- a model is published as a manifest plus fp32 parts; ``ModelAssembler`` rebuilds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from fedmq import codec
from fedmq.wire import GlobalModel, ModelUpdate, Tensor, newer

F32 = npt.NDArray[np.float32]

#: Room left in every chunk for the header (ids, metrics, msgpack framing).
HEADER_ALLOWANCE = 2048
MIN_CHUNK_BYTES = 4096

Encoder = Callable[[str, F32], Tensor]


def _ranges(sizes: Sequence[int], per_chunk: int) -> list[list[tuple[int, int, int]]]:
    """Cut the concatenation of tensors of ``sizes`` into chunks of ``per_chunk`` elements.

    Each chunk is a list of (tensor index, offset, count).
    """
    chunks: list[list[tuple[int, int, int]]] = [[]]
    room = per_chunk
    for i, size in enumerate(sizes):
        offset = 0
        while offset < size:
            if room == 0:
                chunks.append([])
                room = per_chunk
            n = min(room, size - offset)
            chunks[-1].append((i, offset, n))
            offset += n
            room -= n
    return [c for c in chunks if c] or [[]]


def split_update(update: ModelUpdate, arrays: Mapping[str, npt.ArrayLike], encode: Encoder,
                 max_bytes: int) -> list[ModelUpdate]:
    """``update`` as one message if it fits in ``max_bytes``, else as chunks that each fit.

    ``arrays`` are the update's tensors before encoding (name → array, in order) and
    ``encode(name, flat_range)`` encodes one range; ``update.tensors`` must already hold the
    whole-tensor encoding (used when it fits).
    """
    if max_bytes < MIN_CHUNK_BYTES:
        raise ValueError(f"max_bytes {max_bytes} is below the minimum of {MIN_CHUNK_BYTES}")
    whole = len(codec.encode(update))
    if whole <= max_bytes:
        return [update]
    flats = {name: np.ascontiguousarray(a, dtype=np.float32).reshape(-1)
             for name, a in arrays.items()}
    shapes = {name: tuple(int(d) for d in np.shape(a)) for name, a in arrays.items()}
    names = list(flats)
    total = sum(f.size for f in flats.values())
    per_element = max(whole - HEADER_ALLOWANCE, 1) / max(total, 1)
    per_chunk = max(1, int((max_bytes - HEADER_ALLOWANCE) / per_element * 0.95))
    while True:
        plan = _ranges([flats[n].size for n in names], per_chunk)
        chunks = []
        for index, pieces in enumerate(plan):
            tensors = tuple(
                dataclasses.replace(encode(names[i], flats[names[i]][off:off + n]),
                                    shape=shapes[names[i]], offset=off, count=n)
                for i, off, n in pieces)
            chunks.append(dataclasses.replace(update, tensors=tensors, chunk=index,
                                              chunks=len(plan)))
        if all(len(codec.encode(c)) <= max_bytes for c in chunks):
            return chunks
        if per_chunk == 1:
            raise ValueError(f"cannot fit a single element per chunk in {max_bytes} bytes")
        per_chunk = max(1, int(per_chunk * 0.7))  # an encoding was larger than estimated


def split_model(model: GlobalModel, max_bytes: int) -> list[GlobalModel]:
    """``model`` whole if it fits, else ``[manifest, part 0, part 1, …]`` (fp32 tensors only)."""
    if len(codec.encode(model)) <= max_bytes:
        return [model]
    if max_bytes < MIN_CHUNK_BYTES:
        raise ValueError(f"max_bytes {max_bytes} is below the minimum of {MIN_CHUNK_BYTES}")
    if any(t.codec != "fp32" or t.span != t.size for t in model.tensors):
        raise ValueError("only whole fp32 tensors can be split into model parts")
    per_chunk = (max_bytes - HEADER_ALLOWANCE) // 4
    plan = _ranges([t.size for t in model.tensors], per_chunk)
    parts = [
        dataclasses.replace(model, chunk=index, chunks=len(plan), metrics={}, tensors=tuple(
            dataclasses.replace(model.tensors[i], data=model.tensors[i].data[4 * off:4 * (off + n)],
                                offset=off, count=n)
            for i, off, n in pieces))
        for index, pieces in enumerate(plan)]
    manifest = dataclasses.replace(model, tensors=(), chunk=None, chunks=len(plan))
    return [manifest, *parts]


class ModelAssembler:
    """Collects a chunked model's manifest and parts; yields the whole model once complete.

    Keeps the parts of the newest version only (by run, then version; older ones are dropped), so
    its memory is one model at most. Integrity is the caller's check (``model_digest`` against
    ``sha256``).
    """

    def __init__(self) -> None:
        self._run = 0
        self._version = -1
        self._manifest: GlobalModel | None = None
        self._parts: dict[int, GlobalModel] = {}

    def add(self, msg: GlobalModel) -> GlobalModel | None:
        """Feed one message from the model topics; the whole model when it is complete."""
        if msg.chunks == 1:
            return msg
        if newer(self._run, self._version, msg.run, msg.version):
            return None
        if newer(msg.run, msg.version, self._run, self._version):
            self._run, self._version = msg.run, msg.version
            self._manifest, self._parts = None, {}
        if msg.chunk is None:
            self._manifest = msg
        else:
            self._parts[msg.chunk] = msg
        m = self._manifest
        if m is None or len(self._parts) < m.chunks:
            return None
        parts = [self._parts[i] for i in range(m.chunks) if i in self._parts]
        if len(parts) != m.chunks or any(p.sha256 != m.sha256 for p in parts):
            return None
        self._manifest, self._parts = None, {}
        return dataclasses.replace(m, tensors=join_ranges(t for p in parts for t in p.tensors),
                                   chunk=None, chunks=1)


def join_ranges(ranges: Iterable[Tensor]) -> tuple[Tensor, ...]:
    """Whole fp32 tensors from fp32 ranges (in order of first appearance)."""
    pieces: dict[str, list[Tensor]] = {}
    for t in ranges:
        pieces.setdefault(t.name, []).append(t)
    out = []
    for name, ts in pieces.items():
        ts.sort(key=lambda t: t.offset)
        first = ts[0]
        expected = 0
        for t in ts:
            if t.codec != "fp32" or t.offset != expected:
                raise ValueError(f"tensor {name!r}: parts do not tile it (gap or overlap at "
                                 f"{t.offset})")
            expected += t.span
        if expected != first.size:
            raise ValueError(f"tensor {name!r}: parts cover {expected} of {first.size} elements")
        out.append(Tensor(name=name, dtype=first.dtype, shape=first.shape, codec="fp32",
                          data=b"".join(t.data for t in ts)))
    return tuple(out)


def place(ranges: Iterable[tuple[Tensor, F32]], shapes: Mapping[str, tuple[int, ...]]
          ) -> dict[str, F32]:
    """Dense arrays from decoded ranges ``(tensor, values of its span)``; gaps stay zero."""
    out = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    for t, values in ranges:
        out[t.name].reshape(-1)[t.offset:t.offset + t.span] = values
    return out

