"""A device's secure-aggregation round as messages (sans I/O; ``fedmq.secagg.client`` does the
cryptography).

``start`` makes the round's keys (``SecAggKeys`` to publish). Then, in whatever order they come:
the roster (answered with ``SecAggShares``), the device's own trained update (``set_update``),
the delivery of its neighbours' shares; once the last two are both there the masked input goes
out, split into ``SecAggMasked`` chunks of at most ``max_chunk_bytes`` of data. The unmasking
request is answered once with ``SecAggReveal``. A message for another federation, run or round
is ignored; one that the protocol forbids answering (``SecAggError``) is ignored with its reason,
and to the aggregator the device has then dropped out, which the protocol tolerates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from fedmq.secagg.client import SecAggClient, SecAggError, Setup
from fedmq.secagg.crypto import Random, RoundContext
from fedmq.secagg.fixedpoint import FixedPoint
from fedmq.secagg.messages import (
    SecAggDelivery,
    SecAggKeys,
    SecAggMasked,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
)
from fedmq.secagg.noise import DeviceNoise

Out = SecAggKeys | SecAggShares | SecAggMasked | SecAggReveal


@dataclass(frozen=True, slots=True)
class Skipped:
    """A message was not answered; ``reason`` is counted in the device's status."""

    reason: str


class DeviceSecAgg:
    """One device's secure-aggregation state, one round at a time."""

    def __init__(self, federation: str, device_id: str, *, max_chunk_bytes: int = 0,
                 random: Random = os.urandom) -> None:
        self.federation = federation
        self.device_id = device_id
        self.max_chunk_bytes = max_chunk_bytes
        self._random = random
        self.ctx: RoundContext | None = None
        self.client: SecAggClient | None = None
        self.fixed: FixedPoint | None = None
        self.size = 0
        self._update: tuple[npt.NDArray[np.float64], float] | None = None
        self._delivery: SecAggDelivery | None = None
        self._sent_masked = False
        #: the round's differential-privacy noise share (fedmq.secagg.noise), None without DP
        self.noise: DeviceNoise | None = None

    def start(self, run: int, round_: int, noise: DeviceNoise | None = None) -> list[Out]:
        """Take part in ``round_`` of ``run``: forget the previous round, advertise new keys
        (nothing if this round has started already: its keys went out). With ``noise`` the
        update is clipped, weighs 1 and carries this device's share of the noise."""
        if self.ctx is not None and (self.ctx.run, self.ctx.round) == (run, round_):
            return []
        self.noise = noise
        self.ctx = RoundContext(self.federation, run, round_)
        self.client = SecAggClient(self.device_id, self.ctx, self._random)
        self.fixed, self.size = None, 0
        self._update, self._delivery, self._sent_masked = None, None, False
        c, s = self.client.advertise()
        return [SecAggKeys(self.federation, run, round_, self.device_id, c, s)]

    def _ours(self, fed: str, run: int, round_: int) -> bool:
        ctx = self.ctx
        return ctx is not None and (fed, run, round_) == (ctx.federation, ctx.run, ctx.round)

    def on_roster(self, msg: SecAggRoster) -> list[Out | Skipped]:
        if not self._ours(msg.federation, msg.run, msg.round) or self.client is None:
            return [Skipped("wrong_round")]
        if self.fixed is not None:
            return []  # the retained roster again
        roster = {d: (c, s) for d, c, s in msg.devices}
        if self.device_id not in roster:
            return [Skipped("not_in_roster")]
        assert self.ctx is not None
        setup = Setup(self.ctx, roster, msg.degree, msg.threshold, msg.graph_seed)
        try:
            fixed = FixedPoint(msg.frac_bits, msg.clip, msg.weight_cap)
            sealed, commitment = self.client.share(setup)
        except (SecAggError, ValueError) as exc:
            return [Skipped(getattr(exc, "reason", "bad_roster"))]
        self.fixed, self.size = fixed, msg.size
        return [SecAggShares(msg.federation, msg.run, msg.round, self.device_id, commitment,
                             sealed)]

    def set_update(self, values: npt.ArrayLike, weight: float) -> list[Out | Skipped]:
        """This device's trained update (flat, float) and its weight."""
        self._update = (np.asarray(values, dtype=np.float64).ravel(), float(weight))
        return self._maybe_mask()

    def on_delivery(self, msg: SecAggDelivery) -> list[Out | Skipped]:
        if not self._ours(msg.federation, msg.run, msg.round) or msg.device != self.device_id:
            return [Skipped("wrong_round")]
        if self._delivery is not None:
            return []
        self._delivery = msg
        return self._maybe_mask()

    def _maybe_mask(self) -> list[Out | Skipped]:
        if (self._sent_masked or self._update is None or self._delivery is None
                or self.client is None or self.fixed is None or self.ctx is None):
            return []
        values, weight = self._update
        if values.size + 1 != self.size:
            self._sent_masked = True
            return [Skipped("wrong_size")]
        if self.noise is not None:
            if self.fixed.clip < self.noise.bound:  # the ring would clip the noise away
                self._sent_masked = True
                return [Skipped("narrow_clip")]
            # clipped, noised here (a server cannot redraw it), weighing w' = 1
            values, weight = self.noise.apply(values), self.fixed.weight_cap
        try:
            masked = self.client.mask(self._delivery.shares, self.fixed.encode(values, weight))
        except SecAggError as exc:
            self._sent_masked = True
            return [Skipped(exc.reason)]
        self._sent_masked = True
        raw = masked.astype("<u4").tobytes()
        per = max(1, self.max_chunk_bytes // 4) if self.max_chunk_bytes else self.size
        c = self.ctx
        return [SecAggMasked(c.federation, c.run, c.round, self.device_id, lo, self.size,
                             raw[4 * lo: 4 * min(self.size, lo + per)])
                for lo in range(0, self.size, per)]

    def on_unmask(self, msg: SecAggUnmask) -> list[Out | Skipped]:
        if not self._ours(msg.federation, msg.run, msg.round) or self.client is None:
            return [Skipped("wrong_round")]
        if not self._sent_masked:
            return [Skipped("no_masked_input")]
        if self.noise is not None and len(msg.survivors) < self.noise.quorum:
            # fewer shares than the noise was calibrated for: the sum would be too little noised
            return [Skipped("below_dp_quorum")]
        try:
            b, s = self.client.unmask(msg.survivors, msg.dropped)
        except SecAggError as exc:
            return [Skipped(exc.reason)]
        return [SecAggReveal(msg.federation, msg.run, msg.round, self.device_id, b, s)]
