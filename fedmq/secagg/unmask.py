"""The server's unmasking arithmetic (pure numpy and ``cryptography``; no numba).

Given the mod-2^32 sum of the survivors' masked inputs, the round's setup and the shares the
responding devices returned, remove

* each survivor's self-mask ``PRG(b_u)``, with ``b_u`` rebuilt from its neighbours' shares and
  checked against the commitment it sent with its shares, and
* the pairwise masks survivors added against devices that sent shares but no masked input: the
  dropped device's ``s`` secret is rebuilt from shares, checked against its advertised public key,
  and each surviving neighbour's mask with it recomputed and taken off.

Pairwise masks between two survivors cancel in the sum by construction. What is left is exactly
the sum of the survivors' fixed-point vectors. A rebuilt secret that fails its check (a device
returned a wrong share) is tried again with other subsets of the shares, a bounded number of
times; ``UnmaskError`` says which device could not be recovered.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np

from fedmq.secagg import shamir
from fedmq.secagg.client import Setup, commit, pairwise_sign
from fedmq.secagg.crypto import KeyPair, prg
from fedmq.secagg.fixedpoint import U32

#: How many subsets of ``t`` shares are tried before giving a secret up.
MAX_SUBSETS = 256

Shares = Sequence[tuple[int, int]]


class UnmaskError(ValueError):
    """The sum cannot be unmasked; ``device`` is the one whose secret could not be rebuilt."""

    def __init__(self, reason: str, device: str) -> None:
        super().__init__(f"{reason}: {device}")
        self.reason = reason
        self.device = device


def _rebuild(shares: Shares, t: int, good: Callable[[bytes], bool], device: str,
             what: str) -> bytes:
    """The secret from ``shares`` that passes ``good`` (a predicate on 32 bytes)."""
    if len({x for x, _ in shares}) < t:
        raise UnmaskError(f"too_few_shares_{what}", device)
    for tries, subset in enumerate(itertools.combinations(shares, t)):
        if tries >= MAX_SUBSETS:
            break
        try:
            secret = shamir.combine(subset, t)
        except shamir.ShamirError:
            continue
        if good(secret):
            return secret
    raise UnmaskError(f"bad_shares_{what}", device)


def rebuild_self_seed(setup: Setup, device: str, shares: Shares, commitment: bytes) -> bytes:
    return _rebuild(shares, setup.threshold,
                    lambda b: commit(setup.ctx, device, b) == commitment, device, "b")


def rebuild_mask_key(setup: Setup, device: str, shares: Shares) -> KeyPair:
    want = setup.roster[device][1]
    secret = _rebuild(shares, setup.threshold, lambda s: KeyPair(s).public == want, device, "s")
    return KeyPair(secret)


def unmask_sum(masked_sum: U32, setup: Setup, *, shared: Collection[str],
               survivors: Collection[str], commitments: Mapping[str, bytes],
               b_shares: Mapping[str, Shares], s_shares: Mapping[str, Shares]) -> U32:
    """The plain sum of the survivors' vectors (a new array; ``masked_sum`` is not changed).

    ``shared`` is U2 (devices whose shares were forwarded), ``survivors`` U3 (whose masked input
    is in ``masked_sum``); ``b_shares[u]`` / ``s_shares[u]`` the shares ``(x, y)`` returned for
    device ``u``'s self-mask seed / mask key.
    """
    total = np.array(masked_sum, dtype=np.uint32, copy=True)
    n = total.size
    alive = set(survivors)
    graph = setup.graph()
    for u in sorted(alive):
        b = rebuild_self_seed(setup, u, b_shares.get(u, ()), commitments.get(u, b""))
        total -= prg(b, n)
    for u in sorted(set(shared) - alive):
        near = graph[u] & alive
        if not near:
            continue
        key = rebuild_mask_key(setup, u, s_shares.get(u, ()))
        for v in sorted(near):
            m = prg(key.mask_seed(setup.roster[v][1], setup.ctx), n)
            # v added sign(v, u) * m; take it off
            if pairwise_sign(v, u) > 0:
                total -= m
            else:
                total += m
    return total
