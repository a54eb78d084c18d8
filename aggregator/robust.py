"""Bounded influence of any one update: the L2 norm bound and its adaptive estimate.

Pure logic (no clock, no I/O): the service asks ``NormBound`` for the bound in force, tells it
each accepted update's norm, and ends each published round with ``end_round``. Folding with
``scale(norm)`` as an extra factor on the weight clips the update to the bound inside the fused
kernel (``acc += w * s * x``), so clipping costs no pass of its own.

The bound is ``clip_norm`` when configured. Otherwise it is ``clip_multiplier`` times a running
estimate ``C`` of the median norm of accepted updates, never above ``max_norm``:

- Bootstrap: with no ``initial_norm``, ``C`` starts as the median of the first
  ``bootstrap_size`` accepted norms of the run (the service holds those whole updates back, up to
  that many, and folds them once the bound is known; docs/robustness.md).
- Each published round then moves ``C`` geometrically (Andrew et al. 2021):
  ``C <- C * exp(-adapt_rate * (b - target_quantile))`` where ``b`` is the fraction of the
  round's accepted norms at or below ``C``. One round moves ``C`` by at most
  ``exp(adapt_rate * max(q, 1 - q))``, whoever sends what.

Chunked updates are bounded as they arrive (``ChunkBudget``): each chunk is folded whole while
the squared norms folded so far fit in ``bound**2``, and the chunk that would pass it is scaled
to what is left (later chunks fold with scale 0). An update under the bound is therefore folded
exactly as a whole update would be; one over it ends with norm at most the bound.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedmq.config import RobustConfig

__all__ = ["ChunkBudget", "NormBound", "SharedBound", "bootstrap_size"]

#: Most whole updates held back to bootstrap the estimate (bounds the memory it costs).
MAX_BOOTSTRAP = 32


#: Fewest norms the estimate starts from when a round may take that many: a median of one or
#: two updates is whatever the first device sent.
MIN_BOOTSTRAP = 8


def bootstrap_size(min_updates: int, max_updates: int) -> int:
    """How many accepted norms start the estimate: the quorum, but at least ``MIN_BOOTSTRAP``
    (when a round can take that many) and at most ``MAX_BOOTSTRAP``. A round that closes with
    fewer starts it from what it has."""
    return max(1, min(max(min_updates, MIN_BOOTSTRAP), max_updates, MAX_BOOTSTRAP))


def scale_for(norm: float, bound: float) -> float:
    """The factor that brings an update of ``norm`` down to ``bound`` (1 when within it)."""
    if norm <= bound:
        return 1.0
    return bound / norm


@dataclass
class NormBound:
    """The per-update norm bound in force, and the estimate that drives it."""

    config: RobustConfig
    bootstrap: int = 1
    #: The running estimate of the target quantile of accepted norms (None: not yet known).
    estimate: float | None = None
    #: This round's accepted norms: how many, and how many were at or below ``estimate``.
    seen: int = 0
    below: int = 0

    def __post_init__(self) -> None:
        if self.estimate is None and self.config.initial_norm is not None:
            self.estimate = float(self.config.initial_norm)
        #: Norms gathered to bootstrap the estimate (at most ``bootstrap`` of them).
        self.early: list[float] = []

    @property
    def active(self) -> bool:
        """Whether updates are bounded at all (``mode`` is not "off")."""
        return self.config.mode != "off"

    @property
    def adaptive(self) -> bool:
        """Whether the bound follows the estimate (no fixed ``clip_norm``)."""
        return self.config.clip_norm is None

    @property
    def bootstrapping(self) -> bool:
        """Whether updates should be held back (not folded) until the estimate is known."""
        return self.active and self.adaptive and self.estimate is None

    def bound(self) -> float:
        """The L2 bound for an update folded now."""
        c = self.config
        if c.clip_norm is not None:
            return min(c.clip_norm, c.max_norm)
        if self.estimate is None:
            return c.max_norm
        return min(c.max_norm, c.clip_multiplier * self.estimate)

    def over(self, norm: float) -> bool:
        """Whether ``norm`` is over the bound (in ``reject`` mode: reject it)."""
        return self.active and norm > self.bound()

    def scale(self, norm: float) -> float:
        """The factor to fold an update of ``norm`` with: 1, or less to clip it to the bound."""
        if self.config.mode != "clip":
            return 1.0
        return scale_for(norm, self.bound())

    def held_scale(self, norm: float) -> float:
        """The factor for an update held back while the estimate started: clipped in both
        modes (in ``reject`` mode it was accepted before its bound was known)."""
        return scale_for(norm, self.bound()) if self.active else 1.0

    def observe(self, norm: float) -> bool:
        """An update of this norm was accepted into the round; True when this completes a
        bootstrap attempt (the estimate started, or could not: held updates are released).

        A zero norm carries no scale: it counts towards the bootstrap's size but not into its
        median, nor into the per-round fraction (a median of zeros would make a bound of 0
        that no geometric step could leave).
        """
        if self.estimate is None:
            # The estimate starts the moment the bootstrap's last norm is in, so the same
            # sequence of accepted updates gives the same bounds however it was batched.
            self.early.append(norm)
            if len(self.early) >= self.bootstrap:
                self.start()
                return True
            return False
        if norm > 0.0:
            self.seen += 1
            if norm <= self.estimate:
                self.below += 1
        return False

    def start(self) -> None:
        """Start the estimate from the non-zero norms gathered so far (at a round's close if
        fewer than ``bootstrap`` arrived). With none, it stays unknown (the bound is
        ``max_norm`` meanwhile) and the next accepted norms try again."""
        if self.estimate is None:
            positive = [x for x in self.early if x > 0.0]
            if positive:
                self.estimate = float(statistics.median(positive))
            self.early = []

    def end_round(self) -> None:
        """A round was published: move the estimate one geometric step, reset the counts."""
        c = self.config
        if self.estimate is not None and self.adaptive and self.seen:
            b = self.below / self.seen
            self.estimate *= math.exp(-c.adapt_rate * (b - c.target_quantile))
        self.new_round()

    def new_round(self) -> None:
        """Forget this round's counts (a round opened, or was dropped unpublished)."""
        self.seen = 0
        self.below = 0

    def export(self) -> dict[str, Any]:
        """The state, for a snapshot (floats round-trip exactly through JSON)."""
        return {"estimate": self.estimate, "seen": self.seen, "below": self.below,
                "early": list(self.early)}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Load what ``export`` gave."""
        est = state.get("estimate")
        self.estimate = None if est is None else float(est)
        self.seen = int(state.get("seen", 0))
        self.below = int(state.get("below", 0))
        self.early = [float(x) for x in state.get("early", [])]


@dataclass
class ChunkBudget:
    """What is left of one chunked update's norm bound (``bound**2`` minus what was folded)."""

    bound: float
    #: Sum of the squared norms folded so far (after scaling).
    spent: float = 0.0
    #: Sum of the chunks' squared norms as sent (the update's norm, once all are in).
    raw: float = 0.0
    #: Over the bound in reject mode: every later chunk is turned away.
    rejected: bool = False

    def take(self, sq_norm: float, clip: bool) -> float | None:
        """The scale to fold a chunk of ``sq_norm`` with; None when it does not fit and
        ``clip`` is false (reject mode)."""
        room = max(self.bound * self.bound - self.spent, 0.0)
        self.raw += sq_norm
        if sq_norm <= room:
            self.spent += sq_norm
            return 1.0
        if not clip:
            self.rejected = True
            return None
        # This chunk takes what is left: the budget is spent, exactly (the rounding of
        # spent + s*s*sq would leave a crumb that later chunks would share by chance).
        self.spent = self.bound * self.bound
        return math.sqrt(room / sq_norm)

    def export(self) -> list[float]:
        """The state, for a snapshot."""
        return [self.bound, self.spent, self.raw, float(self.rejected)]

    @classmethod
    def restore(cls, saved: Sequence[float]) -> ChunkBudget:
        """Load what ``export`` gave."""
        rejected = bool(saved[3]) if len(saved) > 3 else False
        return cls(float(saved[0]), float(saved[1]), float(saved[2]), rejected)


class SharedBound(NormBound):
    """A scale-out worker's bound: the adaptive estimate is its coordinator's, computed once
    from every worker's norms (``aggregator.cluster_coordinator``) and received per round with
    ``apply``. This side never starts or moves it; until it is known for the round, updates are
    held back exactly as during a single aggregator's bootstrap."""

    def observe(self, norm: float) -> bool:
        return False

    def start(self) -> None:
        self.early = []  # the coordinator's estimate, or max_norm: never one of our own

    def end_round(self) -> None:
        self.new_round()

    def apply(self, estimate: float | None) -> bool:
        """Take the coordinator's estimate for the open round; True when updates held back for
        it should now be folded."""
        if estimate is None or not self.bootstrapping:
            return False
        self.estimate = float(estimate)
        return True

    def forget(self) -> None:
        """A new round: its estimate comes from the coordinator again."""
        if self.adaptive:
            self.estimate = None
        self.early = []
