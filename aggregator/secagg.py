"""One secure-aggregation round on the aggregator (sans I/O: payloads and times in, actions out).

Phases, each with its own deadline (``phase_s`` from the phase's start), every change one row of
``_NEXT``::

    ADVERTISE ──keys in (max, or min + grace, or deadline with min)──▶ SHARE   [publish roster]
    SHARE     ──every roster device shared, or deadline──────────────▶ MASKED  [deliver shares]
    MASKED    ──every sharing device's masked input whole, or deadline▶ UNMASK  [unmask request]
    UNMASK    ──every secret rebuildable and the sum unmasks, or all──▶ DONE    [Unmasked]
                answered, or deadline
    any phase ──too few devices for the quorum or the threshold──────▶ FAILED  [Failed(reason)]

``receive`` never raises: a payload that does not decode, belongs to another round, comes from
a device outside the phase's set, or contradicts what the device sent before is counted under a
reason (``REASONS``) and dropped. Masked inputs (whole or in chunks) are added to one uint32 ring
accumulator the moment they arrive (``aggregator.kernel_secagg``): the round holds the sum of
masked vectors, never one device's vector, and never an unmasked one (unmasking happens once, on
the sum of at least ``threshold`` devices). A chunk that overlaps one already added is refused; a
device whose chunks are not all in at the MASKED deadline fails the round ("incomplete_masked"):
its partial masks cannot be taken off without learning its input.

Replaying the accepted payloads and the phase-changing ticks, in order, through a new instance
gives the same state and the same actions (the write-ahead log relies on it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Final

import numpy as np
import numpy.typing as npt

from aggregator.kernel_secagg import fold_masked
from fedmq.errors import DecodeError, ProtocolError
from fedmq.secagg import codec, shamir
from fedmq.secagg.client import Setup
from fedmq.secagg.crypto import RoundContext
from fedmq.secagg.fixedpoint import FixedPoint
from fedmq.secagg.graph import default_degree, default_threshold, x_coordinates
from fedmq.secagg.messages import (
    SecAggDelivery,
    SecAggKeys,
    SecAggMasked,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggTopics,
    SecAggUnmask,
)
from fedmq.secagg.unmask import UnmaskError, unmask_sum

U32 = npt.NDArray[np.uint32]
F64 = npt.NDArray[np.float64]

#: Why a secure-aggregation message is dropped (counted per reason).
REASONS: tuple[str, ...] = (
    "malformed", "oversize", "wrong_federation", "wrong_device", "wrong_round", "wrong_phase",
    "not_in_roster", "duplicate", "conflict", "wrong_neighbours", "wrong_size", "overlap",
    "not_survivor", "wrong_shares", "late",
)
#: Why a round fails (the service opens the next one on the same model).
FAILURES: tuple[str, ...] = ("below_quorum", "incomplete_masked", "unmask_failed")


class Phase(Enum):
    ADVERTISE = auto()
    SHARE = auto()
    MASKED = auto()
    UNMASK = auto()
    DONE = auto()
    FAILED = auto()


_NEXT: Final[dict[Phase, Phase]] = {
    Phase.ADVERTISE: Phase.SHARE,
    Phase.SHARE: Phase.MASKED,
    Phase.MASKED: Phase.UNMASK,
    Phase.UNMASK: Phase.DONE,
}


@dataclass(frozen=True, slots=True)
class SecAggRules:
    """How many devices a round needs and takes, and how long each phase may last."""

    min_devices: int
    max_devices: int
    phase_s: float
    grace_s: float = 0.0
    #: SecAgg+ degree k and threshold t (None: ``graph.default_degree`` / ``default_threshold``)
    degree: int | None = None
    threshold: int | None = None
    #: the fixed-point encoding: values clipped to +-clip after weighting, weights / weight_cap
    clip: float = 4.0
    weight_cap: float = 1000.0

    def __post_init__(self) -> None:
        if self.min_devices < 2:
            raise ValueError("secure aggregation needs min_devices >= 2 (one device's sum is "
                             "its input)")
        if self.max_devices < self.min_devices:
            raise ValueError("max_devices must be at least min_devices")
        if not self.phase_s > 0 or self.grace_s < 0:
            raise ValueError("phase_s must be > 0 and grace_s >= 0")


# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Publish:
    """Send ``payload`` on ``topic`` (retained when ``retain``)."""

    topic: str
    payload: bytes
    retain: bool = True


@dataclass(frozen=True, slots=True)
class Dropped:
    """A message was refused; count ``reason``."""

    device: str
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Unmasked:
    """The round's result: ``sum(w' * x)`` and ``sum(w')`` over ``survivors``."""

    weighted_sum: F64
    total_weight: float
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str
    detail: str = ""


Action = Publish | Dropped | Unmasked | Failed


@dataclass
class _Intake:
    """A device's masked input so far: ranges added, values covered."""

    ranges: list[tuple[int, int]] = field(default_factory=list)
    covered: int = 0


class SecAggRound:
    """The aggregator's side of one round. ``size`` is the masked vector's length (model
    parameters + 1)."""

    def __init__(self, federation: str, run: int, round_: int, *, size: int,
                 rules: SecAggRules, now: float,
                 limits: codec.SecAggLimits = codec.DEFAULT) -> None:
        self.federation, self.run, self.round = federation, run, round_
        self.ctx = RoundContext(federation, run, round_)
        self.size = size
        self.rules = rules
        self.limits = limits
        self.topics = SecAggTopics(federation)
        self.fixed = FixedPoint.for_devices(rules.max_devices, rules.clip, rules.weight_cap)
        self.phase = Phase.ADVERTISE
        self.deadline = now + rules.phase_s
        self.quorum_at: float | None = None
        self.keys: dict[str, tuple[bytes, bytes]] = {}
        self.setup: Setup | None = None
        self.graph: dict[str, frozenset[str]] = {}
        self.shares: dict[str, SecAggShares] = {}
        self.acc: U32 = np.zeros(size, dtype=np.uint32)
        self.intake: dict[str, _Intake] = {}
        self.survivors: tuple[str, ...] = ()
        self.dropped: tuple[str, ...] = ()
        self.b_shares: dict[str, list[tuple[int, int]]] = {}
        self.s_shares: dict[str, list[tuple[int, int]]] = {}
        self.revealed: set[str] = set()

    # ---------------------------------------------------------------- events

    def receive(self, topic: str, payload: bytes | memoryview, now: float) -> list[Action]:
        """A device's message. Never raises."""
        where = self.topics.device_of(topic)
        if where is None:
            return [Dropped("", "wrong_device", topic[-64:])]
        step, device = where
        try:
            msg = codec.decode(payload, self.limits)
        except DecodeError as exc:
            return [Dropped(device, exc.reason, str(exc))]
        if msg.federation != self.federation:
            return [Dropped(device, "wrong_federation")]
        if (msg.run, msg.round) != (self.run, self.round):
            return [Dropped(device, "wrong_round")]
        if getattr(msg, "device", None) != device:
            return [Dropped(device, "wrong_device", "payload names another device")]
        if self.phase is Phase.DONE:  # answers still coming after the sum was unmasked
            return [Dropped(device, "late")]
        match step, msg:
            case "keys", SecAggKeys():
                return self._keys(msg, now)
            case "shares", SecAggShares():
                return self._shares(msg, now)
            case "masked", SecAggMasked():
                return self._masked(msg, now)
            case "reveal", SecAggReveal():
                return self._reveal(msg, now)
        return [Dropped(device, "malformed", f"a {type(msg).__name__} on {step}/")]

    def tick(self, now: float) -> list[Action]:
        """Close the phase if its time has come."""
        if self.phase is Phase.ADVERTISE:
            n = len(self.keys)
            due = n >= self.rules.min_devices and (
                now >= self.deadline
                or (self.quorum_at is not None and now >= self.quorum_at + self.rules.grace_s))
            if due:
                return self._close_advertise(now)
            if now >= self.deadline:
                return self._fail("below_quorum", f"{n} devices advertised keys")
        elif self.phase in (Phase.SHARE, Phase.MASKED, Phase.UNMASK) and now >= self.deadline:
            return self._close(now, deadline=True)
        return []

    # ---------------------------------------------------------------- steps

    def _keys(self, msg: SecAggKeys, now: float) -> list[Action]:
        if self.phase is not Phase.ADVERTISE:
            return [Dropped(msg.device, "wrong_phase")]
        old = self.keys.get(msg.device)
        if old is not None:
            same = old == (msg.c_key, msg.s_key)
            return [Dropped(msg.device, "duplicate" if same else "conflict")]
        if len(self.keys) >= self.rules.max_devices:
            return [Dropped(msg.device, "wrong_phase", "the round is full")]
        if msg.c_key == msg.s_key:
            return [Dropped(msg.device, "conflict", "the two keys must differ")]
        self.keys[msg.device] = (msg.c_key, msg.s_key)
        if len(self.keys) == self.rules.min_devices:
            self.quorum_at = now
        if len(self.keys) >= self.rules.max_devices:
            return self._close_advertise(now)
        return []

    def _shares(self, msg: SecAggShares, now: float) -> list[Action]:
        if self.phase is not Phase.SHARE:
            return [Dropped(msg.device, "wrong_phase")]
        if msg.device not in self.keys:
            return [Dropped(msg.device, "not_in_roster")]
        if msg.device in self.shares:
            same = self.shares[msg.device] == msg
            return [Dropped(msg.device, "duplicate" if same else "conflict")]
        if set(msg.shares) != self.graph[msg.device]:
            return [Dropped(msg.device, "wrong_neighbours")]
        self.shares[msg.device] = msg
        if len(self.shares) == len(self.keys):
            return self._close(now)
        return []

    def _masked(self, msg: SecAggMasked, now: float) -> list[Action]:
        if self.phase is not Phase.MASKED:
            return [Dropped(msg.device, "wrong_phase")]
        if msg.device not in self.shares:
            return [Dropped(msg.device, "not_in_roster", "sent no shares")]
        if msg.size != self.size:
            return [Dropped(msg.device, "wrong_size", f"{msg.size} != {self.size}")]
        got = self.intake.setdefault(msg.device, _Intake())
        lo, hi = msg.offset, msg.offset + len(msg.data) // 4
        if (lo, hi) in got.ranges:
            return [Dropped(msg.device, "duplicate")]
        if any(lo < b and a < hi for a, b in got.ranges):
            return [Dropped(msg.device, "overlap", f"[{lo}, {hi})")]
        fold_masked(self.acc, msg.data, lo)
        got.ranges.append((lo, hi))
        got.covered += hi - lo
        if all(self._whole(d) for d in self.shares):
            return self._close(now)
        return []

    def _whole(self, device: str) -> bool:
        got = self.intake.get(device)
        return got is not None and got.covered == self.size

    def _reveal(self, msg: SecAggReveal, now: float) -> list[Action]:
        if self.phase is not Phase.UNMASK:
            return [Dropped(msg.device, "wrong_phase")]
        if msg.device not in self.survivors:
            return [Dropped(msg.device, "not_survivor")]
        if msg.device in self.revealed:
            return [Dropped(msg.device, "duplicate")]
        near = self.graph[msg.device]
        alive, gone = set(self.survivors), set(self.dropped)
        if not (set(msg.b_shares) <= near & alive and set(msg.s_shares) <= near & gone):
            return [Dropped(msg.device, "wrong_shares", "shares for devices it cannot hold")]
        try:
            b = {u: shamir.from_bytes(y) for u, y in msg.b_shares.items()}
            s = {u: shamir.from_bytes(y) for u, y in msg.s_shares.items()}
        except shamir.ShamirError as exc:
            return [Dropped(msg.device, "wrong_shares", str(exc))]
        x = x_coordinates(list(self.keys))[msg.device]
        for u, y in b.items():
            self.b_shares.setdefault(u, []).append((x, y))
        for u, y in s.items():
            self.s_shares.setdefault(u, []).append((x, y))
        self.revealed.add(msg.device)
        if self.revealed == alive or self._enough():
            return self._close(now)
        return []

    def _enough(self) -> bool:
        t = self.setup.threshold if self.setup is not None else 0
        gone_near = {u for u in self.dropped if self.graph[u] & set(self.survivors)}
        return (all(len(self.b_shares.get(u, ())) >= t for u in self.survivors)
                and all(len(self.s_shares.get(u, ())) >= t for u in gone_near))

    # ---------------------------------------------------------------- phase changes

    def _advance(self, now: float) -> None:
        nxt = _NEXT.get(self.phase)
        if nxt is None:
            raise ProtocolError(f"no phase after {self.phase.name}")
        self.phase = nxt
        self.deadline = now + self.rules.phase_s

    def _fail(self, reason: str, detail: str = "") -> list[Action]:
        self.phase = Phase.FAILED
        return [Failed(reason, detail)]

    def graph_seed(self) -> bytes:
        """Fixed by the round, so a replay builds the same graph."""
        return hashlib.sha256(self.ctx.salt() + b"/graph").digest()

    def _close_advertise(self, now: float) -> list[Action]:
        n = len(self.keys)
        k = self.rules.degree if self.rules.degree is not None else default_degree(n)
        k = min(k, n - 1)
        t = self.rules.threshold if self.rules.threshold is not None else default_threshold(k)
        if not 1 <= t <= k:
            return self._fail("below_quorum", f"threshold {t} with {k} neighbours")
        self.setup = Setup(self.ctx, dict(sorted(self.keys.items())), k, t, self.graph_seed())
        self.graph = self.setup.graph()
        self._advance(now)
        roster = SecAggRoster(
            self.federation, self.run, self.round,
            devices=tuple((d, c, s) for d, (c, s) in sorted(self.keys.items())), degree=k,
            threshold=t, graph_seed=self.setup.graph_seed, frac_bits=self.fixed.frac_bits,
            clip=self.fixed.clip, weight_cap=self.fixed.weight_cap, size=self.size)
        return [Publish(self.topics.roster, codec.encode(roster))]

    def _close(self, now: float, deadline: bool = False) -> list[Action]:
        assert self.setup is not None
        t = self.setup.threshold
        if self.phase is Phase.SHARE:
            if len(self.shares) < max(self.rules.min_devices, t):
                return self._fail("below_quorum", f"{len(self.shares)} devices shared")
            self._advance(now)
            out: list[Action] = []
            for v in sorted(self.shares):
                inbox = {u: self.shares[u].shares[v] for u in sorted(self.graph[v])
                         if u in self.shares}
                msg = SecAggDelivery(self.federation, self.run, self.round, v, inbox)
                out.append(Publish(self.topics.deliver(v), codec.encode(msg)))
            return out
        if self.phase is Phase.MASKED:
            partial = sorted(d for d in self.intake if not self._whole(d))
            if partial:
                return self._fail("incomplete_masked", ", ".join(partial[:5]))
            self.survivors = tuple(sorted(self.intake))
            self.dropped = tuple(sorted(set(self.shares) - set(self.intake)))
            if len(self.survivors) < max(self.rules.min_devices, t):
                return self._fail("below_quorum", f"{len(self.survivors)} masked inputs")
            self._advance(now)
            req = SecAggUnmask(self.federation, self.run, self.round, self.survivors,
                               self.dropped)
            return [Publish(self.topics.unmask, codec.encode(req))]
        if self.phase is Phase.UNMASK:
            try:
                total = unmask_sum(
                    self.acc, self.setup, shared=set(self.shares), survivors=self.survivors,
                    commitments={d: m.commitment for d, m in self.shares.items()},
                    b_shares=self.b_shares, s_shares=self.s_shares)
            except UnmaskError as exc:
                if not deadline and self.revealed != set(self.survivors):
                    return []  # a wrong share: wait for more answers
                return self._fail("unmask_failed", str(exc))
            self._advance(now)
            sums, weight = self.fixed.decode_sum(total)
            self.acc = np.zeros(0, dtype=np.uint32)  # the round's only copy of the sum is out
            return [Unmasked(sums, weight, self.survivors, self.dropped)]
        return []

    # ---------------------------------------------------------------- for tests and metrics

    def counts(self) -> Mapping[str, int]:
        return {"advertised": len(self.keys), "shared": len(self.shares),
                "masked": len(self.survivors) or sum(self._whole(d) for d in self.intake),
                "revealed": len(self.revealed)}
