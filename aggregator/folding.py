"""Folding accepted updates into the strategy under the norm bound (docs/robustness.md).

``BoundedFold`` decides when and with which clip factor each accepted update is folded: whole
updates wait for the worker's batch (folded together, cache-blocked); while the bound's estimate
is bootstrapped everything accepted is held back, whole updates and chunks, and folded, clipped,
the moment the bound is known; a chunk of a chunked update folds under its update's budget.
Updates always fold in the order they were accepted, however the worker batches messages, so a
replay of the log after a crash gives the same bits. No I/O, no clock (timings are counters).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from aggregator.chunks import PendingChunks
from aggregator.ledger import RoundLedger, Stats
from aggregator.robust import ChunkBudget, NormBound
from aggregator.strategies import Strategy
from fedmq.wire import ModelUpdate

__all__ = ["MAX_HELD_BYTES", "BoundedFold", "HeldChunked", "Offered"]

#: Most bytes of chunks held back while the norm estimate is bootstrapped (more are turned away
#: as ``overload``): whole updates are at most ``robust.MAX_BOOTSTRAP``, chunks are bounded here.
MAX_HELD_BYTES = 256 * 1024 * 1024

#: An accepted whole update: (update, the weight it counts with, its squared norm).
Offered = tuple[ModelUpdate, float, float]
Key = tuple[str, str]


@dataclass
class HeldChunked:
    """A complete chunked update accepted while its chunks were held back."""

    key: Key
    pending: PendingChunks
    weight: float


class BoundedFold:
    """Folds a round's accepted updates into ``strategy`` under ``bound``."""

    def __init__(self, strategy: Strategy, bound: NormBound, stats: Stats, *,
                 max_examples: int, reject_mode: bool) -> None:
        self.strategy = strategy
        self.bound = bound
        self.stats = stats
        self.max_examples = max_examples
        self.reject_mode = reject_mode
        self.ledger = RoundLedger()
        # Accepted whole updates waiting for the batch's fold.
        self.deferred: list[Offered] = []
        # Accepted updates held back until the norm estimate is bootstrapped, in order.
        self.held: list[Offered | HeldChunked] = []
        self.held_bytes = 0  # chunks held back, in payload bytes
        #: Async mode: the staleness weight of an update by its base version, multiplied into
        #: its clip factor (so it shrinks the update's pull, not its share of the mean's
        #: denominator: FedBuff). None: every update folds whole (sync mode).
        self.discount: Callable[[int], float] | None = None
        #: Differential privacy (docs/privacy.md): every update weighs 1, whatever it claims.
        self.unit_weight = False

    def new_round(self, ledger: RoundLedger) -> None:
        """Drop whatever the last round had waiting (an abandoned round's updates go with it)."""
        self.ledger = ledger
        self.deferred = []
        self.held = []
        self.held_bytes = 0

    def accept(self, offered: Offered) -> None:
        """A whole update was accepted: folded with its batch (or held, see the module)."""
        self.deferred.append(offered)

    def hold_chunked(self, key: Key, pending: PendingChunks, weight: float) -> None:
        """A chunked update whose chunks are held back was accepted."""
        self.flush()  # whole updates accepted before it are held first (acceptance order)
        self.held.append(HeldChunked(key, pending, weight))

    def hold_chunk(self, pending: PendingChunks, update: ModelUpdate, sq: float,
                   size: int) -> bool:
        """Hold one chunk back while the bound is unknown; False if the holding is full."""
        size = max(size, 1)  # a held chunk always shows in held_bytes (see ``holding``)
        if self.held_bytes + size > MAX_HELD_BYTES:
            return False
        assert pending.waiting is not None
        self.held_bytes += size
        pending.waiting.append((update.tensors, sq))
        return True

    def fold_chunk(self, key: Key, pending: PendingChunks, update: ModelUpdate, weight: float,
                   sq: float) -> float | None:
        """Fold one chunk under its update's budget; the factor it took, or None when it is
        over the bound in reject mode (nothing folded)."""
        scale = pending.budget.take(sq, clip=not self.reject_mode)
        if scale is None:
            return None
        # Whole updates accepted before this chunk fold first: the same order as replay,
        # which folds each message as it is handled (so the same bits after a crash).
        self.flush()
        t0 = time.perf_counter()
        self.strategy.fold_part(key, update.tensors, self._weight(weight),
                                scale * self._factor(update.base_version))
        self.stats.fold_seconds += time.perf_counter() - t0
        return scale

    def settle(self, key: Key, pending: PendingChunks) -> None:
        """All chunks of a chunked update folded as they came are in: it counts whole."""
        self.strategy.settle(key)
        self.clip(0.0 if pending.budget.spent < pending.budget.raw else 1.0)

    def flush(self, pending: Mapping[Key, PendingChunks] | None = None, *,
              closing: bool = False, release: bool = False) -> None:
        """Fold the accepted updates waiting in this batch, each clipped to the norm bound.

        While the bound's estimate is bootstrapped they are held back instead; they are folded,
        clipped to the bound just found, the moment the bootstrap ends (``release``) or the
        round closes (``closing``: then the estimate starts from what is in). ``pending``, the
        chunked updates in flight, have their held chunks folded then too.
        """
        if closing and self.bound.bootstrapping:
            self.bound.start()
            release = True
        if release or (self.bound.bootstrapping and self.deferred):
            self.held.extend(self.deferred)
            self.deferred = []
        if release:
            # A bootstrap that found no non-zero norm releases only what it held whole (zero
            # updates); chunks in flight wait for a bound, or for the round's close.
            in_flight = pending if closing or not self.bound.bootstrapping else None
            self._release(in_flight)
            return
        if self.bound.bootstrapping or not self.deferred:
            return
        batch, self.deferred = self.deferred, []
        t0 = time.perf_counter()
        items = [(u.tensors, self._weight(weight),
                  self.clip(self.bound.scale(math.sqrt(sq))) * self._factor(u.base_version))
                 for u, weight, sq in batch]
        if len(items) == 1:
            self.strategy.fold(*items[0])
        else:
            self.strategy.fold_many(items)
        self.stats.last_fold_at = time.perf_counter()
        self.stats.fold_seconds += self.stats.last_fold_at - t0

    def holding(self) -> bool:
        """Whether anything is held back for the bootstrap (then no snapshot: the log has it).

        Held chunks always count in ``held_bytes`` (zeroed only when every chunk in flight is
        folded), so this is O(1) on the worker's every step, not a scan of the chunks in flight.
        """
        return bool(self.held) or self.held_bytes > 0

    def clip(self, scale: float) -> float:
        """Count a clip factor below 1 (the update was scaled down to the bound)."""
        if scale < 1.0:
            self.stats.clipped += 1
            self.ledger.clipped += 1
        return scale

    def _release(self, in_flight: Mapping[Key, PendingChunks] | None) -> None:
        """Fold everything held back, in the order it was accepted, then the held chunks of
        the chunked updates in flight (their later chunks fold as they arrive)."""
        held, self.held = self.held, []
        t0 = time.perf_counter()
        for item in held:
            if isinstance(item, HeldChunked):
                budget = self._fold_waiting(item.key, item.pending, item.weight)
                self.strategy.settle(item.key)
                self.clip(0.0 if budget.spent < budget.raw else 1.0)
            else:
                u, weight, sq = item
                self.strategy.fold(u.tensors, self._weight(weight),
                                   self.clip(self.bound.held_scale(math.sqrt(sq)))
                                   * self._factor(u.base_version))
        if in_flight is not None:
            self.held_bytes = 0
            for key, p in in_flight.items():
                if p.waiting is not None:
                    self._fold_waiting(key, p, float(min(p.header[3], self.max_examples)))
        self.stats.last_fold_at = time.perf_counter()
        self.stats.fold_seconds += self.stats.last_fold_at - t0

    def _fold_waiting(self, key: Key, pending: PendingChunks, weight: float) -> ChunkBudget:
        """Fold a chunked update's held chunks under a budget from the bound now in force."""
        budget = ChunkBudget(self.bound.bound() if self.bound.active else math.inf)
        factor = self._factor(pending.header[1])  # header: (round, base_version, ...)
        for tensors, sq in pending.waiting or []:
            scale = budget.take(sq, clip=True)  # held, so clipped in reject mode too
            assert scale is not None
            self.strategy.fold_part(key, tensors, self._weight(weight), scale * factor)
        pending.budget = budget
        pending.waiting = None
        return budget

    def _weight(self, weight: float) -> float:
        return 1.0 if self.unit_weight else weight

    def _factor(self, base_version: int) -> float:
        return 1.0 if self.discount is None else self.discount(base_version)
