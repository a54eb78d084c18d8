"""The round state machine, sans I/O: events in, actions out, the clock always an argument.

Every phase change is one row of ``_TRANSITIONS`` below. ``RoundMachine.handle`` first reduces an
event to a ``_Trigger`` (a pure look at the event and the state), then looks the pair
(phase, trigger) up; a pair that is not in the table is illegal and raises ``ProtocolError``
before anything is touched, so the state is exactly as it was.

::

    IDLE ──OpenRound──▶ OPEN ──min-th Accept──▶ QUORUM ──Tick ≥ close_at──▶ CLOSED
                         │ ╰─Tick ≥ deadline: extend (stays OPEN) or abandon ──▶ CLOSED
                         ╰────────────── max-th Accept (from OPEN or QUORUM) ──▶ CLOSED
    CLOSED ──OpenRound (higher round number)──▶ OPEN

Updates are legal in every phase (the network can send anything at any time): they yield
``Accept`` or ``Reject``, never an exception. Closing by time happens only on ``Tick``; an update
that arrives after the deadline but before the tick that notices it is still accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final, Literal

from fedmq.errors import ProtocolError

BelowQuorum = Literal["extend", "reannounce"]
#: "buffer": an asynchronous round (``aggregator.async_rounds``) took its ``buffer_size``-th update.
#: "collected": a scale-out worker's round, closed by its coordinator (``CloseRequested``).
ClosedBy = Literal["max_updates", "grace", "deadline", "buffer", "collected"]
RejectReason = Literal["stale", "unknown_round", "duplicate", "round_closed"]


def _check_time(what: str, value: float) -> None:
    # NaN would compare false forever and stall the round; inf would close it at once.
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number of seconds, got {value!r}")


@dataclass(frozen=True, slots=True)
class RoundRules:
    """When a round closes: quorum, cap, deadline, grace, and what to do below quorum.

    ``max_extensions`` bounds the ``"extend"`` policy (0 = unlimited); once a positive limit is
    used up, a round that is still below quorum at its deadline is abandoned.
    """

    min_updates: int
    max_updates: int
    deadline_s: float
    grace_s: float
    below_quorum: BelowQuorum = "extend"
    max_extensions: int = 0

    def __post_init__(self) -> None:
        if self.min_updates < 1:
            raise ValueError(f"min_updates must be at least 1, got {self.min_updates}")
        if self.max_updates < self.min_updates:
            raise ValueError(f"max_updates ({self.max_updates}) must be at least "
                             f"min_updates ({self.min_updates})")
        _check_time("deadline_s", self.deadline_s)
        if self.deadline_s <= 0:
            raise ValueError(f"deadline_s must be greater than 0, got {self.deadline_s}")
        _check_time("grace_s", self.grace_s)
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be 0 or more, got {self.grace_s}")
        if self.below_quorum not in ("extend", "reannounce"):
            raise ValueError(f"below_quorum must be 'extend' or 'reannounce', "
                             f"got {self.below_quorum!r}")
        if self.max_extensions < 0:
            raise ValueError(f"max_extensions must be 0 (unlimited) or more, "
                             f"got {self.max_extensions}")
        if self.max_extensions and self.below_quorum != "extend":
            raise ValueError("max_extensions only applies to below_quorum='extend'; "
                             "set it to 0 or switch the policy")


class Phase(Enum):
    """Where the current round is."""

    IDLE = auto()  # no round opened yet
    OPEN = auto()  # collecting, below quorum
    QUORUM = auto()  # min_updates reached; waiting for grace, deadline or max_updates
    CLOSED = auto()  # closed or abandoned; waiting for the next OpenRound


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpenRound:
    """Start round ``round`` on model ``base_version``; round numbers must strictly increase."""

    round: int
    base_version: int
    now: float

    def __post_init__(self) -> None:
        _check_time("now", self.now)


@dataclass(frozen=True, slots=True)
class UpdateOffered:
    """A device's update arrived (already decoded and checked) at time ``now``."""

    device_id: str
    round: int
    base_version: int
    update_id: str
    now: float

    def __post_init__(self) -> None:
        _check_time("now", self.now)


@dataclass(frozen=True, slots=True)
class Tick:
    """The clock reads ``now``."""

    now: float

    def __post_init__(self) -> None:
        _check_time("now", self.now)


@dataclass(frozen=True, slots=True)
class CloseRequested:
    """Someone else decided the round is over (a scale-out worker's coordinator collects it):
    close it now, whatever the quorum. Closing a closed round again does nothing."""

    round: int


Event = OpenRound | UpdateOffered | Tick | CloseRequested


# --- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accept:
    """Fold this update into the round's running sum."""

    device_id: str
    update_id: str


@dataclass(frozen=True, slots=True)
class Reject:
    """Drop this update and count ``reason``."""

    device_id: str
    update_id: str
    reason: RejectReason


@dataclass(frozen=True, slots=True)
class CloseRound:
    """Finalize the round from its ``accepted`` updates and publish the new model."""

    round: int
    base_version: int
    accepted: int
    closed_by: ClosedBy


@dataclass(frozen=True, slots=True)
class ExtendDeadline:
    """Below quorum at the deadline: re-announce the round with the new ``deadline``."""

    round: int
    deadline: float
    extensions: int


@dataclass(frozen=True, slots=True)
class AbandonRound:
    """Below quorum for good: discard the partial sum and open a new round on the same base."""

    round: int
    base_version: int
    accepted: int


Action = Accept | Reject | CloseRound | ExtendDeadline | AbandonRound


# --- the table ----------------------------------------------------------------------------------


class _Trigger(Enum):
    OPEN = auto()
    OFFER_REJECTED = auto()
    OFFER_ACCEPTED = auto()  # accepted, neither the min-th nor the max-th
    OFFER_QUORUM = auto()  # the min_updates-th accept (and not the max-th)
    OFFER_MAX = auto()  # the max_updates-th accept
    TICK_WAIT = auto()  # nothing due
    TICK_CLOSE = auto()  # close_at reached in QUORUM
    TICK_EXTEND = auto()  # deadline reached below quorum, policy extends
    TICK_ABANDON = auto()  # deadline reached below quorum, policy or limit abandons
    CLOSE = auto()  # CloseRequested for the current round
    CLOSE_OTHER = auto()  # CloseRequested for another round, or again: nothing to do


_TRANSITIONS: Final[dict[tuple[Phase, _Trigger], Phase]] = {
    (Phase.IDLE, _Trigger.OPEN): Phase.OPEN,
    (Phase.IDLE, _Trigger.OFFER_REJECTED): Phase.IDLE,
    (Phase.IDLE, _Trigger.TICK_WAIT): Phase.IDLE,
    (Phase.OPEN, _Trigger.OFFER_REJECTED): Phase.OPEN,
    (Phase.OPEN, _Trigger.OFFER_ACCEPTED): Phase.OPEN,
    (Phase.OPEN, _Trigger.OFFER_QUORUM): Phase.QUORUM,
    (Phase.OPEN, _Trigger.OFFER_MAX): Phase.CLOSED,
    (Phase.OPEN, _Trigger.TICK_WAIT): Phase.OPEN,
    (Phase.OPEN, _Trigger.TICK_EXTEND): Phase.OPEN,
    (Phase.OPEN, _Trigger.TICK_ABANDON): Phase.CLOSED,
    (Phase.QUORUM, _Trigger.OFFER_REJECTED): Phase.QUORUM,
    (Phase.QUORUM, _Trigger.OFFER_ACCEPTED): Phase.QUORUM,
    (Phase.QUORUM, _Trigger.OFFER_MAX): Phase.CLOSED,
    (Phase.QUORUM, _Trigger.TICK_WAIT): Phase.QUORUM,
    (Phase.QUORUM, _Trigger.TICK_CLOSE): Phase.CLOSED,
    (Phase.CLOSED, _Trigger.OPEN): Phase.OPEN,
    (Phase.CLOSED, _Trigger.OFFER_REJECTED): Phase.CLOSED,
    (Phase.CLOSED, _Trigger.TICK_WAIT): Phase.CLOSED,
    (Phase.OPEN, _Trigger.CLOSE): Phase.CLOSED,
    (Phase.QUORUM, _Trigger.CLOSE): Phase.CLOSED,
    (Phase.IDLE, _Trigger.CLOSE_OTHER): Phase.IDLE,
    (Phase.OPEN, _Trigger.CLOSE_OTHER): Phase.OPEN,
    (Phase.QUORUM, _Trigger.CLOSE_OTHER): Phase.QUORUM,
    (Phase.CLOSED, _Trigger.CLOSE_OTHER): Phase.CLOSED,
}


class RoundMachine:
    """Owns one federation's rounds; feed it events with ``handle`` and carry out the actions."""

    def __init__(self, rules: RoundRules) -> None:
        self._rules = rules
        self._phase = Phase.IDLE
        self._round: int | None = None
        self._base_version: int | None = None
        self._opened_at: float | None = None
        self._deadline: float | None = None
        self._close_at: float | None = None
        self._close_by: ClosedBy = "deadline"
        self._extensions = 0
        # Only accepted ids are remembered, so dedupe memory is O(max_updates) per round.
        self._accepted_ids: list[tuple[str, str]] = []
        self._devices: set[str] = set()
        self._update_ids: set[str] = set()

    # --- read-only view ---

    @property
    def rules(self) -> RoundRules:
        return self._rules

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def round(self) -> int | None:
        """The current (or last) round number; None before the first OpenRound."""
        return self._round

    @property
    def base_version(self) -> int | None:
        return self._base_version

    @property
    def opened_at(self) -> float | None:
        return self._opened_at

    @property
    def deadline(self) -> float | None:
        """The current deadline, moved by each extension."""
        return self._deadline

    @property
    def close_at(self) -> float | None:
        """When a Tick closes the round; None unless the phase is QUORUM."""
        return self._close_at

    @property
    def extensions(self) -> int:
        """Deadline extensions granted in the current round."""
        return self._extensions

    @property
    def accepted(self) -> int:
        return len(self._accepted_ids)

    @property
    def accepted_ids(self) -> tuple[tuple[str, str], ...]:
        """(device_id, update_id) of every accepted update this round, in arrival order."""
        return tuple(self._accepted_ids)

    # --- transitions ---

    def check(self, offer: UpdateOffered) -> RejectReason | None:
        """What ``handle(offer)`` would reject it for now, without changing anything.

        Lets the caller admit the chunks of a large update before the update, complete, is
        offered for real.
        """
        return self._verdict(offer)

    def handle(self, event: Event) -> list[Action]:
        """Apply ``event``; raise ProtocolError (state untouched) if it is illegal now."""
        trigger, reason = self._classify(event)
        next_phase = _TRANSITIONS.get((self._phase, trigger))
        if next_phase is None:
            raise ProtocolError(f"{type(event).__name__} is not allowed in phase "
                                f"{self._phase.name} (round {self._round})")
        if (isinstance(event, OpenRound) and self._round is not None
                and event.round <= self._round):
            raise ProtocolError(f"OpenRound({event.round}) must have a round number above "
                                f"the last one ({self._round})")
        # Nothing above mutates: everything below runs only for a legal event.
        actions = self._apply(event, trigger, reason)
        self._phase = next_phase
        if next_phase is not Phase.QUORUM:
            self._close_at = None
        return actions

    def _classify(self, event: Event) -> tuple[_Trigger, RejectReason | None]:
        """Reduce ``event`` to a trigger (and a reject reason); reads state, never writes it."""
        if isinstance(event, OpenRound):
            return _Trigger.OPEN, None
        if isinstance(event, UpdateOffered):
            reason = self._verdict(event)
            if reason is not None:
                return _Trigger.OFFER_REJECTED, reason
            count = len(self._accepted_ids) + 1
            if count == self._rules.max_updates:
                return _Trigger.OFFER_MAX, None
            if count == self._rules.min_updates:
                return _Trigger.OFFER_QUORUM, None
            return _Trigger.OFFER_ACCEPTED, None
        if isinstance(event, Tick):
            return self._tick_trigger(event.now), None
        if isinstance(event, CloseRequested):
            if event.round == self._round and self._phase in (Phase.OPEN, Phase.QUORUM):
                return _Trigger.CLOSE, None
            return _Trigger.CLOSE_OTHER, None
        raise ProtocolError(f"not a round event: {event!r}")

    def _verdict(self, offer: UpdateOffered) -> RejectReason | None:
        """Why ``offer`` is rejected, or None to accept it; checks in order round, base, dupes."""
        if self._phase is Phase.IDLE or self._round is None:
            return "round_closed"
        if offer.round < self._round:
            return "stale"
        if offer.round > self._round:
            return "unknown_round"
        if self._phase is Phase.CLOSED:
            return "round_closed"
        if offer.base_version != self._base_version:
            return "stale"
        if offer.device_id in self._devices or offer.update_id in self._update_ids:
            return "duplicate"
        return None

    def _tick_trigger(self, now: float) -> _Trigger:
        if self._phase is Phase.QUORUM:
            assert self._close_at is not None
            return _Trigger.TICK_CLOSE if now >= self._close_at else _Trigger.TICK_WAIT
        if self._phase is Phase.OPEN:
            assert self._deadline is not None
            if now < self._deadline:
                return _Trigger.TICK_WAIT
            limit = self._rules.max_extensions
            if self._rules.below_quorum == "extend" and (limit == 0 or self._extensions < limit):
                return _Trigger.TICK_EXTEND
            return _Trigger.TICK_ABANDON
        return _Trigger.TICK_WAIT

    def _apply(self, event: Event, trigger: _Trigger,
               reason: RejectReason | None) -> list[Action]:
        rules = self._rules
        if isinstance(event, OpenRound):
            self._round = event.round
            self._base_version = event.base_version
            self._opened_at = event.now
            self._deadline = event.now + rules.deadline_s
            self._extensions = 0
            self._accepted_ids = []
            self._devices = set()
            self._update_ids = set()
            return []
        if isinstance(event, UpdateOffered):
            if trigger is _Trigger.OFFER_REJECTED:
                assert reason is not None
                return [Reject(event.device_id, event.update_id, reason)]
            self._accepted_ids.append((event.device_id, event.update_id))
            self._devices.add(event.device_id)
            self._update_ids.add(event.update_id)
            accept = Accept(event.device_id, event.update_id)
            if trigger is _Trigger.OFFER_QUORUM:
                assert self._deadline is not None
                grace_end = event.now + rules.grace_s
                # A grace that would run past the deadline is cut short by it.
                self._close_by = "grace" if grace_end < self._deadline else "deadline"
                self._close_at = min(grace_end, self._deadline)
            elif trigger is _Trigger.OFFER_MAX:
                return [accept, self._close_round("max_updates")]
            return [accept]
        if isinstance(event, CloseRequested):
            return [self._close_round("collected")] if trigger is _Trigger.CLOSE else []
        # Tick
        if trigger is _Trigger.TICK_CLOSE:
            return [self._close_round(self._close_by)]
        if trigger is _Trigger.TICK_EXTEND:
            assert self._round is not None
            self._extensions += 1
            self._deadline = event.now + rules.deadline_s
            return [ExtendDeadline(self._round, self._deadline, self._extensions)]
        if trigger is _Trigger.TICK_ABANDON:
            assert self._round is not None
            assert self._base_version is not None
            return [AbandonRound(self._round, self._base_version, self.accepted)]
        return []

    def _close_round(self, closed_by: ClosedBy) -> CloseRound:
        assert self._round is not None
        assert self._base_version is not None
        return CloseRound(self._round, self._base_version, self.accepted, closed_by)
