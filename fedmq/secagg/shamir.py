"""Shamir secret sharing of 32-byte secrets over GF(P), P = 2^521 - 1 (a Mersenne prime).

A secret ``s < 2^256 < P`` is the constant term of a random polynomial of degree ``t - 1``; the
share for x-coordinate ``x`` (1 ... P-1) is ``(x, f(x))``. Any ``t`` shares give ``s`` back by
Lagrange interpolation at 0; fewer reveal nothing about it (every value of ``s`` fits them
equally). A share's value travels as ``SHARE_BYTES`` big-endian bytes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from fedmq.secagg.crypto import Random

P = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)
SECRET_BYTES = 32


class ShamirError(ValueError):
    """Shares that cannot give a secret back (too few, repeated or bad x, value out of range)."""


def _coefficient(random: Random) -> int:
    # 80 random bytes reduced mod P: the bias is below 2^-119.
    return int.from_bytes(random(80), "big") % P


def split(secret: bytes, xs: Sequence[int], t: int, random: Random = os.urandom) -> list[int]:
    """The values ``f(x)`` for each ``x`` in ``xs`` of a fresh degree ``t - 1`` polynomial."""
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"a secret is {SECRET_BYTES} bytes; got {len(secret)}")
    if not 1 <= t <= len(xs):
        raise ShamirError(f"threshold {t} needs 1 <= t <= {len(xs)} shares")
    if len(set(xs)) != len(xs) or any(not 0 < x < P for x in xs):
        raise ShamirError("share x-coordinates must be distinct and in [1, P)")
    coeffs = [int.from_bytes(secret, "big")] + [_coefficient(random) for _ in range(t - 1)]
    out = []
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % P
        out.append(y)
    return out


def combine(shares: Iterable[tuple[int, int]], t: int) -> bytes:
    """The secret from at least ``t`` shares ``(x, y)`` (the first ``t`` distinct are used)."""
    seen: dict[int, int] = {}
    for x, y in shares:
        if not 0 < x < P or not 0 <= y < P:
            raise ShamirError("share out of range")
        seen.setdefault(x, y)
    if t < 1 or len(seen) < t:
        raise ShamirError(f"{len(seen)} distinct shares, threshold {t}")
    pts = list(seen.items())[:t]
    s = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, (xj, _) in enumerate(pts):
            if i != j:
                num = num * xj % P
                den = den * (xj - xi) % P
        s = (s + yi * num * pow(den, -1, P)) % P
    if s >= 1 << (8 * SECRET_BYTES):
        raise ShamirError("shares do not give a 32-byte secret")
    return s.to_bytes(SECRET_BYTES, "big")


def to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def from_bytes(raw: bytes) -> int:
    if len(raw) != SHARE_BYTES:
        raise ShamirError(f"a share is {SHARE_BYTES} bytes; got {len(raw)}")
    y = int.from_bytes(raw, "big")
    if y >= P:
        raise ShamirError("share out of range")
    return y
