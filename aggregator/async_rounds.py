"""Asynchronous buffered rounds (FedBuff, Nguyen et al. 2022), sans I/O like ``rounds``.

In async mode a round is one *buffer*: it opens on the current model version *v* and closes when
``buffer_size`` (K) updates are accepted (``closed_by = "buffer"``), or at its deadline once
``min_updates`` are in (``"deadline"``); below that at the deadline it is extended, never
abandoned. An update counts whatever round it answered, if the version it was trained from, *b*,
is at most ``max_staleness`` versions behind: ``0 <= v - b <= max_staleness``. It then folds with
its staleness weight (``staleness_weight``) times its examples; the buffer's mean divides by the
examples alone, so a stale update pulls the model less instead of being renormalised away
(FedBuff's ``Δ̄ = (1/K) Σ s(τᵢ)·Δᵢ``, weighted by examples as in sync mode).

Duplicates: a device counts once per base version, and an ``update_id`` once, across buffers. The
accepted updates of closed buffers are remembered while their base version is still within
``max_staleness`` of the current one (older ones are ``stale`` anyway), so the memory is
O(K · max_staleness). The remembered updates are part of a snapshot (``export`` / ``restore``);
the open buffer's are rebuilt by replaying its events, like a sync round's.

The machine is ``RoundMachine`` with other acceptance rules: the same events, actions and phase
table, so the service, ``closing`` and ``checkpoint`` drive both alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from aggregator.rounds import (
    Action,
    ClosedBy,
    CloseRound,
    Event,
    OpenRound,
    Phase,
    RejectReason,
    RoundMachine,
    RoundRules,
    UpdateOffered,
    _Trigger,
)
from fedmq.config import RoundsConfig

__all__ = ["AsyncRoundMachine", "AsyncRules", "StalenessWeight", "machine_for",
           "staleness_weight", "summary_metrics"]

StalenessWeight = Literal["sqrt", "poly", "constant"]

#: A remembered accepted update: (device, update_id, base_version).
Record = tuple[str, str, int]


def staleness_weight(kind: StalenessWeight, staleness: int, exponent: float = 0.5) -> float:
    """The factor an update ``staleness`` versions old folds with: ``1/sqrt(1+s)`` ("sqrt",
    FedBuff's), ``(1+s)**-exponent`` ("poly") or 1 ("constant"); in (0, 1]."""
    if staleness < 0:
        raise ValueError(f"staleness must be 0 or more, got {staleness}")
    if kind == "constant":
        return 1.0
    if kind == "sqrt":
        return 1.0 / math.sqrt(1.0 + staleness)
    if kind == "poly":
        return float((1.0 + staleness) ** -exponent)
    raise ValueError(f"staleness weight must be 'sqrt', 'poly' or 'constant', got {kind!r}")


@dataclass(frozen=True, slots=True)
class AsyncRules:
    """When a buffer closes and which updates it takes (``[rounds]`` in async mode)."""

    buffer_size: int
    max_staleness: int
    min_updates: int = 1
    deadline_s: float = 60.0
    weight: StalenessWeight = "sqrt"
    exponent: float = 0.5

    def __post_init__(self) -> None:
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be 0 or more, got {self.max_staleness}")
        if not (math.isfinite(self.exponent) and self.exponent >= 0):
            raise ValueError(f"staleness exponent must be finite and >= 0, got {self.exponent}")
        staleness_weight(self.weight, 0, self.exponent)  # an unknown kind fails here
        self.round_rules()  # buffer_size, min_updates and deadline_s are checked there

    def round_rules(self) -> RoundRules:
        """The sync rules that behave like a buffer: close at K; at the deadline with at least
        ``min_updates`` (a grace as long as the deadline never ends first); extend below."""
        return RoundRules(min_updates=self.min_updates, max_updates=self.buffer_size,
                          deadline_s=self.deadline_s, grace_s=self.deadline_s)


class AsyncRoundMachine(RoundMachine):
    """``RoundMachine`` for asynchronous buffers (see the module)."""

    def __init__(self, rules: AsyncRules) -> None:
        super().__init__(rules.round_rules())
        self.async_rules = rules
        # Accepted updates of closed buffers still within the staleness window, and the open
        # buffer's; the sets index both for the duplicate check.
        self._closed: list[Record] = []
        self._buffer: list[Record] = []
        self._pairs: set[tuple[str, int]] = set()
        self._ids: set[str] = set()

    # --- read-only view ---

    @property
    def version(self) -> int | None:
        """The model version the open buffer folds into (its base)."""
        return self._base_version

    def weight(self, base_version: int) -> float:
        """The staleness weight of an update trained from ``base_version``, folded now."""
        assert self._base_version is not None
        r = self.async_rules
        return staleness_weight(r.weight, self._base_version - base_version, r.exponent)

    @property
    def buffer_staleness(self) -> tuple[int, ...]:
        """The staleness of each update accepted into the open buffer, in arrival order."""
        v = self._base_version or 0
        return tuple(v - base for _, _, base in self._buffer)

    @property
    def remembered(self) -> int:
        """Accepted updates remembered for the duplicate check (closed buffers and open one)."""
        return len(self._closed) + len(self._buffer)

    # --- snapshots ---

    def export(self) -> list[list[str | int]]:
        """The closed buffers' remembered updates, for a snapshot (JSON-ready)."""
        return [[d, u, b] for d, u, b in self._closed]

    def restore(self, records: Iterable[Sequence[str | int]]) -> None:
        """Take back ``export``'s records, right after the ``OpenRound`` of a recovery."""
        if self._buffer:
            raise ValueError("restore() must come before any update of the open buffer")
        self._closed = [(str(d), str(u), int(b)) for d, u, b in records]
        self._prune()

    def retire(self, device_id: str, update_id: str, base_version: int) -> None:
        """Remember an update that counted in part in a closed buffer (a chunked update whose
        last chunks had not come): its later chunks are ``duplicate``, not a new update."""
        self._closed.append((device_id, update_id, base_version))
        self._pairs.add((device_id, base_version))
        self._ids.add(update_id)

    # --- the rules ---

    def _verdict(self, offer: UpdateOffered) -> RejectReason | None:
        """Why ``offer`` is rejected, or None: round, base version (a version not published yet
        is as unknown as a future round), staleness, phase, duplicates."""
        if self._phase is Phase.IDLE or self._round is None or self._base_version is None:
            return "round_closed"
        if offer.round > self._round or offer.base_version > self._base_version:
            return "unknown_round"
        if self._base_version - offer.base_version > self.async_rules.max_staleness:
            return "stale"
        if self._phase is Phase.CLOSED:
            return "round_closed"
        if ((offer.device_id, offer.base_version) in self._pairs
                or offer.update_id in self._ids):
            return "duplicate"
        return None

    def _apply(self, event: Event, trigger: _Trigger,
               reason: RejectReason | None) -> list[Action]:
        if isinstance(event, OpenRound):
            self._closed.extend(self._buffer)  # an abandoned buffer's too: resends stay out
            self._buffer = []
            actions = super()._apply(event, trigger, reason)
            self._prune()
            return actions
        actions = super()._apply(event, trigger, reason)
        if isinstance(event, UpdateOffered) and trigger is not _Trigger.OFFER_REJECTED:
            self._buffer.append((event.device_id, event.update_id, event.base_version))
            self._pairs.add((event.device_id, event.base_version))
            self._ids.add(event.update_id)
        return actions

    def _close_round(self, closed_by: ClosedBy) -> CloseRound:
        return super()._close_round("buffer" if closed_by == "max_updates" else closed_by)

    def _prune(self) -> None:
        """Forget closed buffers' updates older than the staleness window (they are stale)."""
        oldest = (self._base_version or 0) - self.async_rules.max_staleness
        self._closed = [r for r in self._closed if r[2] >= oldest]
        live = self._closed + self._buffer
        self._pairs = {(d, b) for d, _, b in live}
        self._ids = {u for _, u, _ in live}


def machine_for(rounds: RoundsConfig) -> RoundMachine:
    """The round machine ``[rounds]`` asks for: sync rounds, or async buffers."""
    if rounds.mode == "async":
        return AsyncRoundMachine(AsyncRules(
            buffer_size=rounds.buffer_size, max_staleness=rounds.max_staleness,
            min_updates=rounds.min_updates, deadline_s=rounds.deadline_s,
            weight=rounds.staleness_weight, exponent=rounds.staleness_exponent))
    return RoundMachine(RoundRules(
        min_updates=rounds.min_updates, max_updates=rounds.max_updates,
        deadline_s=rounds.deadline_s, grace_s=rounds.grace_s, below_quorum=rounds.below_quorum,
        max_extensions=rounds.max_extensions))


def summary_metrics(machine: RoundMachine) -> dict[str, float]:
    """An async buffer's staleness for its summary (``staleness_mean``, ``staleness_max``);
    nothing for a sync round."""
    if not isinstance(machine, AsyncRoundMachine) or not machine.buffer_staleness:
        return {}
    s = machine.buffer_staleness
    return {"staleness_mean": sum(s) / len(s), "staleness_max": float(max(s))}
