"""The SecAgg+ neighbour graph (Bell et al. 2020): each device talks to ``k`` others, not all.

The round's devices are put in a pseudo-random order (sorted by SHA-256 of the round's graph seed
and the device id) and each is linked to the ``k / 2`` devices before and after it on that ring (a
Harary graph, as in Bell et al. and Flower's SecAgg+): every device has exactly ``k`` neighbours
and the graph is the same on every device and on the server, computed from the roster alone. With
``k >= n - 1`` it is the complete graph of the original protocol. A device masks with its
neighbours only and Shamir-shares its secrets among them, so its cost grows with ``k``
(about ``log n``), not with ``n``.

The threshold ``t`` is how many of a device's neighbours must answer the unmasking request for
its secrets to be recovered; fewer than ``t`` colluding neighbours (and the server) learn nothing.
``default_degree`` and ``default_threshold`` are the values used when the config gives none.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence


def default_degree(n: int) -> int:
    """An even ``k`` of about ``3 log2 n``, at least 4 (complete below 6 devices)."""
    k = max(4, 2 * math.ceil(1.5 * math.log2(max(n, 2))))
    return min(k, n - 1) if n > 1 else 0


def default_threshold(k: int) -> int:
    """A majority of the neighbours: ``k // 2 + 1``."""
    return k // 2 + 1


def ring_order(roster: Sequence[str], seed: bytes) -> list[str]:
    return sorted(set(roster), key=lambda d: (hashlib.sha256(seed + d.encode()).digest(), d))


def neighbours(roster: Sequence[str], k: int, seed: bytes) -> dict[str, frozenset[str]]:
    """Each device's neighbours (never itself). ``k`` is rounded down to even unless
    ``k >= n - 1`` (then every other device)."""
    order = ring_order(roster, seed)
    n = len(order)
    if k >= n - 1:
        every = frozenset(order)
        return {d: every - {d} for d in order}
    half = k // 2
    out: dict[str, frozenset[str]] = {}
    for i, d in enumerate(order):
        out[d] = frozenset(order[(i + j) % n] for j in range(-half, half + 1) if j != 0)
    return out


def x_coordinates(roster: Sequence[str]) -> dict[str, int]:
    """Each device's Shamir x-coordinate: its 1-based place in the sorted roster."""
    return {d: i + 1 for i, d in enumerate(sorted(set(roster)))}
