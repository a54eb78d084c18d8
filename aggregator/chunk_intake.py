"""Chunked updates coming in: each chunk folded (or held) as it arrives, the update offered to
the round once its last chunk is in.

Functions of the service rather than methods, like ``checkpoint``: they read and change its
state, but they are one responsibility, the chunk path, kept apart from the worker's wiring.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from aggregator.chunks import MAX_PENDING_CHUNKED, PendingChunks, overlaps
from aggregator.robust import ChunkBudget
from aggregator.rounds import Accept, UpdateOffered
from fedmq.wire import ModelUpdate

if TYPE_CHECKING:
    from aggregator.service import AggregatorService

__all__ = ["complete_chunked", "fold_chunk", "handle_chunk"]


def handle_chunk(svc: AggregatorService, update: ModelUpdate, offer: UpdateOffered, *,
                 weight: float, sq: float) -> None:
    """Fold one chunk now; offer the update to the round once its last chunk is in.

    Everything that would make the completed update unacceptable (its round, base,
    device or id) is checked on the first chunk, and every later chunk must repeat the
    same header and cover new coordinates only: a folded chunk cannot be taken back, so
    a chunk is folded only if the update can still complete and count.
    """
    key = (update.device_id, update.update_id)
    header = (update.round, update.base_version, update.chunks, update.num_examples)
    pending = svc._pending.get(key)
    if pending is None:
        reason: str | None = svc.machine.check(offer)
        if reason is None and (update.device_id in svc._pending_devices
                               or update.update_id in svc._pending_ids):
            reason = "duplicate"  # one update in flight per device, ids unique per round
        if reason is None and len(svc._pending) >= MAX_PENDING_CHUNKED:
            reason = "overload"
        if reason is not None:
            svc._reject(update.device_id, update.update_id, reason)
            return
        # The bound is fixed at the first chunk for the whole update; while it is being
        # bootstrapped the chunks are held back and it is fixed when they are folded.
        bound = svc.bound.bound() if svc.bound.active else math.inf
        pending = PendingChunks(header, set(), [], ChunkBudget(bound),
                                [] if svc.bound.bootstrapping else None)
    elif header != pending.header:
        svc._reject(update.device_id, update.update_id, "malformed")
        return
    if update.chunk in pending.received:
        svc._reject(update.device_id, update.update_id, "duplicate")
        return
    ranges = sorted((svc.spec.offsets[svc.spec.index(t.name)] + t.offset,
                     svc.spec.offsets[svc.spec.index(t.name)] + t.offset + t.span)
                    for t in update.tensors)
    if overlaps(sorted(pending.covered + ranges)):
        svc._reject(update.device_id, update.update_id, "malformed")
        return
    if pending.waiting is not None:
        size = len(svc._current.payload) if svc._current is not None else 0
        if not svc.folder.hold_chunk(pending, update, sq, size):
            svc._reject(update.device_id, update.update_id, "overload")
            return
        svc._log()
    elif not fold_chunk(svc, key, pending, update, weight=weight, sq=sq):
        return
    pending.received.add(update.chunk)
    pending.covered.extend(ranges)
    svc._pending[key] = pending
    svc._pending_devices.add(update.device_id)
    svc._pending_ids.add(update.update_id)
    if len(pending.received) == update.chunks:
        complete_chunked(svc, pending, update, offer, weight=weight, sq=sq)

def complete_chunked(svc: AggregatorService, pending: PendingChunks, update: ModelUpdate,
                     offer: UpdateOffered, *, weight: float, sq: float) -> None:
    """Every chunk of ``update`` is in: offer it to the round."""
    key = (update.device_id, update.update_id)
    if sum(b - a for a, b in pending.covered) != svc.spec.total:
        # All chunks are in but leave coordinates out: it stays an incomplete update (it
        # counts where it delivered, like one whose chunks were lost) and is rejected.
        if pending.waiting is None:
            del svc._pending[key]
        # else it stays in flight, so its held chunks are folded with the others
        svc._reject(update.device_id, update.update_id, "malformed")
        return
    del svc._pending[key]
    actions = svc.machine.handle(offer)
    for action in actions:
        if not isinstance(action, Accept):
            continue
        if pending.waiting is not None:
            # Folded when the bootstrap ends, which accepting it may do right now.
            svc.folder.hold_chunked(key, pending, weight)
            svc._accepted(update, weight, sum(sq for _, sq in pending.waiting))
        else:
            svc.folder.settle(key, pending)
            svc._accepted(update, weight, pending.budget.raw)
    svc._apply([a for a in actions if not isinstance(a, Accept)], (update, weight, sq))

def fold_chunk(svc: AggregatorService, key: tuple[str, str], pending: PendingChunks,
               update: ModelUpdate, *, weight: float, sq: float) -> bool:
    """Fold one chunk under its update's budget; False if it was rejected instead."""
    if pending.budget.rejected:
        svc._reject(update.device_id, update.update_id, "norm_bound")
        return False
    if svc.folder.fold_chunk(key, pending, update, weight, sq) is None:
        # Over the bound in reject mode: what was folded stays as an incomplete update
        # (within the bound); this chunk and every later one are turned away.
        svc._pending[key] = pending
        svc._pending_devices.add(update.device_id)
        svc._pending_ids.add(update.update_id)
        svc._reject(update.device_id, update.update_id, "norm_bound",
                     f"over {pending.budget.bound:.4g}")
        return False
    svc._log()
    return True
