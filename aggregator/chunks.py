"""Bookkeeping of chunked updates being received (docs/protocol.md, section 6a): which chunks of
an update are in, which coordinates they covered, and what is left of its norm budget."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aggregator.robust import ChunkBudget
from fedmq.wire import Tensor

__all__ = ["PendingChunks", "export_pending", "overlaps", "restore_pending"]

#: Chunked updates that may be in flight at once (each costs a few bytes of bookkeeping).
MAX_PENDING_CHUNKED = 100_000

Key = tuple[str, str]  # (device id, update id)


@dataclass
class PendingChunks:
    """A chunked update being received."""

    header: tuple[int, int, int, int]  # round, base_version, chunks, num_examples
    received: set[int]
    covered: list[tuple[int, int]]  # flat [start, stop) ranges folded so far
    budget: ChunkBudget  # what is left of its norm bound
    #: Chunks held back, not folded, while the norm estimate is being bootstrapped:
    #: (tensors, squared norm) in arrival order; None once its budget is fixed.
    waiting: list[tuple[tuple[Tensor, ...], float]] | None = None


def overlaps(ranges: list[tuple[int, int]]) -> bool:
    """Whether any two of the sorted [start, stop) ranges share a coordinate."""
    return any(b[0] < a[1] for a, b in itertools.pairwise(ranges))


def export_pending(pending: Mapping[Key, PendingChunks]) -> list[list[Any]]:
    """JSON-ready rows, for a mid-round snapshot."""
    if any(p.waiting is not None for p in pending.values()):
        raise ValueError("chunks held back for the norm bound are in no snapshot (the log has "
                         "them); snapshot once they are folded")
    return [[d, u, list(p.header), sorted(p.received), p.covered, p.budget.export()]
            for (d, u), p in pending.items()]


def restore_pending(rows: Iterable[list[Any]]) -> dict[Key, PendingChunks]:
    """What ``export_pending`` gave (rows written before norm budgets: an unbounded one)."""
    out: dict[Key, PendingChunks] = {}
    for d, u, header, received, covered, *budget in rows:
        saved = budget[0] if budget else [math.inf, 0.0, 0.0]
        out[(d, u)] = PendingChunks(tuple(header), set(received), [(a, b) for a, b in covered],
                                    ChunkBudget.restore(saved))
    return out
