"""One device's side of one secure-aggregation round (pure: messages in, messages out).

The four steps, each called once, in order (Bonawitz et al. 2017, section 4, with the SecAgg+
graph):

1. ``advertise()``: two fresh X25519 public keys, ``c`` (to seal shares) and ``s`` (mask seeds).
2. ``share(setup)``: given the roster of devices that advertised, their keys and the graph
   parameters, draw the self-mask seed ``b``, Shamir-share ``b`` and the secret half of ``s``
   among the graph neighbours (threshold ``t``) and seal each neighbour's pair of shares with
   AES-GCM under the ``c`` key agreed with it. Also gives ``commit(b)``, a SHA-256 commitment the
   server uses to tell a reconstructed seed from garbage.
3. ``mask(sealed, vector)``: open the shares the neighbours sent (the server forwards those it
   accepted: that set is the neighbours this device masks against); return
   ``vector + PRG(b) + sum over those neighbours u of sign(self, u) * PRG(s_{self,u})`` mod 2^32,
   with sign +1 when this device's id sorts before ``u``'s, else -1, so each pair's masks cancel.
4. ``unmask(survivors, dropped)``: for the neighbours whose masked input arrived, the shares of
   their ``b``; for those that sent shares but no masked input, the shares of their ``s`` secret.
   Never both for one device, at most one answer per round, and only when at least ``t``
   devices survived: otherwise the server could learn an individual input.

Anything inconsistent raises ``SecAggError`` (the service counts its reason and sends nothing for
the step: to the server the device has dropped out, which the protocol handles).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from fedmq.secagg import shamir
from fedmq.secagg.crypto import KeyPair, Random, RoundContext, SealError, open_sealed, prg, seal
from fedmq.secagg.fixedpoint import U32
from fedmq.secagg.graph import neighbours, x_coordinates

SHARE_PAIR_BYTES = 2 * shamir.SHARE_BYTES


class SecAggError(ValueError):
    """A step could not be taken; ``reason`` is the counted reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Setup:
    """The server's answer to the advertisements: who is in the round and how they connect."""

    ctx: RoundContext
    #: device id -> (c public key, s public key), the devices that advertised (U1)
    roster: Mapping[str, tuple[bytes, bytes]]
    degree: int
    threshold: int
    graph_seed: bytes

    def graph(self) -> dict[str, frozenset[str]]:
        return neighbours(list(self.roster), self.degree, self.graph_seed)


def commit(ctx: RoundContext, device: str, seed: bytes) -> bytes:
    """The commitment to a self-mask seed: SHA-256 over context, device and seed."""
    return hashlib.sha256(ctx.salt() + b"\x00" + device.encode() + b"\x00" + seed).digest()


def pairwise_sign(me: str, other: str) -> int:
    return 1 if me < other else -1


class SecAggClient:
    """One device, one round."""

    def __init__(self, device_id: str, ctx: RoundContext, random: Random = os.urandom) -> None:
        self.device_id = device_id
        self.ctx = ctx
        self._random = random
        self._c = KeyPair.generate(random)
        self._s = KeyPair.generate(random)
        self._b = random(shamir.SECRET_BYTES)
        self._setup: Setup | None = None
        self._neighbours: frozenset[str] = frozenset()
        #: sender -> (x of this device, s share, b share) received in step 3
        self._held: dict[str, tuple[int, int, int]] = {}
        self._masked = False
        self._answered: tuple[frozenset[str], frozenset[str]] | None = None

    def advertise(self) -> tuple[bytes, bytes]:
        """(c public key, s public key)."""
        return self._c.public, self._s.public

    def share(self, setup: Setup) -> tuple[dict[str, bytes], bytes]:
        """(recipient -> sealed shares, commitment to b) for the neighbours in ``setup``."""
        if self._setup is not None:
            raise SecAggError("out_of_order", "shares already sent")
        if setup.ctx != self.ctx:
            raise SecAggError("wrong_round")
        if setup.roster.get(self.device_id) != self.advertise():
            raise SecAggError("not_in_roster", "the roster does not hold this device's keys")
        near = setup.graph()[self.device_id]
        if not 1 <= setup.threshold <= len(near):
            raise SecAggError("bad_threshold", f"t={setup.threshold}, {len(near)} neighbours")
        xs = x_coordinates(list(setup.roster))
        order = sorted(near)
        xs_n = [xs[v] for v in order]
        s_sh = shamir.split(self._s.secret, xs_n, setup.threshold, self._random)
        b_sh = shamir.split(self._b, xs_n, setup.threshold, self._random)
        out = {}
        for v, s_y, b_y in zip(order, s_sh, b_sh, strict=True):
            key = self._c.seal_key(setup.roster[v][0], self.ctx)
            plain = shamir.to_bytes(s_y) + shamir.to_bytes(b_y)
            out[v] = seal(key, self.ctx, self.device_id, v, plain, random=self._random)
        self._setup = setup
        self._neighbours = near
        return out, commit(self.ctx, self.device_id, self._b)

    def mask(self, sealed: Mapping[str, bytes], vector: U32) -> U32:
        """The masked input: ``vector`` plus the self-mask and the pairwise masks."""
        setup = self._setup
        if setup is None or self._masked:
            raise SecAggError("out_of_order", "mask before share, or twice")
        if set(sealed) - self._neighbours:
            raise SecAggError("not_neighbour", "a share from a device that is not a neighbour")
        x_me = x_coordinates(list(setup.roster))[self.device_id]
        held: dict[str, tuple[int, int, int]] = {}
        for u, blob in sealed.items():
            key = self._c.seal_key(setup.roster[u][0], self.ctx)
            try:
                plain = open_sealed(key, self.ctx, u, self.device_id, blob)
            except SealError as exc:
                raise SecAggError("bad_seal", f"from {u}") from exc
            if len(plain) != SHARE_PAIR_BYTES:
                raise SecAggError("bad_seal", f"from {u}: {len(plain)} bytes")
            try:
                s_y = shamir.from_bytes(plain[: shamir.SHARE_BYTES])
                b_y = shamir.from_bytes(plain[shamir.SHARE_BYTES:])
            except shamir.ShamirError as exc:
                raise SecAggError("bad_seal", str(exc)) from exc
            held[u] = (x_me, s_y, b_y)
        v = np.ascontiguousarray(vector, dtype=np.uint32).copy()
        n = v.size
        v += prg(self._b, n)
        for u in sorted(held):
            m = prg(self._s.mask_seed(setup.roster[u][1], self.ctx), n)
            if pairwise_sign(self.device_id, u) > 0:
                v += m
            else:
                v -= m
        self._held = held
        self._masked = True
        return v

    def unmask(self, survivors: Collection[str], dropped: Collection[str]
               ) -> tuple[dict[str, bytes], dict[str, bytes]]:
        """(device -> share of its b for survivors, device -> share of its s for dropped), over
        the neighbours whose shares this device holds."""
        setup = self._setup
        if setup is None or not self._masked:
            raise SecAggError("out_of_order", "unmask before mask")
        alive, gone = frozenset(survivors), frozenset(dropped)
        if self._answered is not None and self._answered != (alive, gone):
            raise SecAggError("conflicting_unmask", "a second request with other sets")
        if alive & gone:
            raise SecAggError("conflicting_unmask", "a device both survived and dropped")
        if self.device_id not in alive:
            raise SecAggError("conflicting_unmask", "this device's masked input is not counted")
        if len(alive) < setup.threshold:
            raise SecAggError("too_few_survivors", f"{len(alive)} < t={setup.threshold}")
        if (alive | gone) - set(setup.roster):
            raise SecAggError("conflicting_unmask", "devices outside the roster")
        self._answered = (alive, gone)
        b_out = {u: shamir.to_bytes(h[2]) for u, h in self._held.items() if u in alive}
        s_out = {u: shamir.to_bytes(h[1]) for u, h in self._held.items() if u in gone}
        return b_out, s_out
