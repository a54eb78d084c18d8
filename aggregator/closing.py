"""Closing a round: the new model checked, published with its summary, or the round abandoned;
then the next round opened or the run ended.

Functions of the service, like ``checkpoint`` and ``chunk_intake``: one responsibility kept
apart from the worker's wiring.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import numpy as np

from aggregator.async_rounds import summary_metrics
from fedmq.errors import ProtocolError
from fedmq.wire import RoundSummary

if TYPE_CHECKING:
    from aggregator.service import AggregatorService, Weights

__all__ = ["abandon", "close_round", "finalize"]

log = logging.getLogger("aggregator.service")


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def finalize(svc: AggregatorService) -> tuple[Weights | None, str, str]:
    """The round's new model, or None with the reason it must not be published.

    A model that is not finite in float32, or that moves farther than
    ``robust.max_change_norm`` from its base, is never published: whatever the updates,
    the round ends cleanly and the federation goes on from the model (and the server
    optimizer's state) it had.
    """
    if svc.privacy is not None:  # the round's noise: the same bits when the log is replayed
        svc.privacy.noise.at(svc.run, svc.round)
    try:
        new = svc.strategy.finalize()
    except (FloatingPointError, ValueError, ProtocolError) as exc:
        return None, "non_finite_model", str(exc)
    change = 0.0
    for name, base in svc.model.items():
        d = new[name].astype(np.float64) - base
        change += float(np.dot(d.ravel(), d.ravel()))
    limit = svc.config.robust.max_change_norm
    if not math.isfinite(change) or math.sqrt(change) > limit:
        return None, "change_too_large", f"change norm {math.sqrt(change):.4g} > {limit:g}"
    return new, "", ""

def abandon(svc: AggregatorService, reason: str, detail: str, now: float) -> None:
    """Drop the round's result unpublished and open the next round on the same model."""
    svc.stats.abandoned[reason] += 1
    log.warning("round %d abandoned: %s (%s); its model is not published; %d updates "
                "discarded; re-announcing on model version %d", svc.round, reason, detail,
                svc.strategy.contributors, svc.version)
    svc._open_round(now)

def close_round(svc: AggregatorService, closed_by: str) -> None:
    svc._flush(closing=True)
    now = svc._now()
    incomplete = svc.strategy.incomplete
    if incomplete:
        log.warning("round %d closed with %d chunked updates incomplete: they count on the "
                    "parameters they delivered only", svc.round, incomplete)
    new, reason, detail = finalize(svc)
    # Noise was drawn: the round costs privacy whether its model is published or abandoned.
    private = svc.privacy.finalized(svc.round) if svc.privacy is not None else {}
    if new is None:
        abandon(svc, reason, detail, now)
        return
    bound = svc.bound.bound() if svc.bound.active else math.inf
    svc.strategy.commit()  # the optimizer state moves only with a published model
    svc.model = new
    svc.bound.end_round()
    svc.version += 1
    metrics = svc.ledger.mean_metrics()  # the devices' training metrics (train_*)
    participants = svc.strategy.contributors
    svc.telemetry.expect(participants, svc.version - 1)
    svc._publish_model(metrics | private | {"participants": float(participants),
                                   "bytes_in": float(svc.ledger.bytes_in)})
    summary = RoundSummary(
        federation=svc.config.federation, round=svc.round, version=svc.version,
        participants=participants, closed_by=closed_by,
        accepted=svc.round_accepted(), rejected=dict(svc.ledger.rejected),
        bytes_in=svc.ledger.bytes_in, duration_s=now - svc._round_opened,
        metrics=metrics | ({"incomplete_updates": float(incomplete)} if incomplete else {})
        | summary_metrics(svc.machine) | private
        | ({"norm_bound": bound, "clipped_updates": float(svc.ledger.clipped)}
           if math.isfinite(bound) else {}))
    svc.publisher.summary(summary)
    svc.last_summary = summary
    svc.stats.rounds_completed += 1
    trained = ", ".join(f"{k.removeprefix('train_')} {v:.4f}"
                        for k, v in sorted(metrics.items()) if k.startswith("train_"))
    if svc.task is not None:  # a statistics federation: the round's result, retained
        svc.task.publish(svc, summary)
    log.info("round %d closed by %s after %.1f s: %d participants (%d clipped), %s in; "
             "model version %d (training %s)", svc.round, closed_by,
             now - svc._round_opened, participants, svc.ledger.clipped,
             _size(svc.ledger.bytes_in), svc.version, trained or "metrics: none")
    max_rounds = svc.config.rounds.max_rounds
    if max_rounds and svc.stats.rounds_completed >= max_rounds:
        svc._announce(now, open_=False)  # tells late devices there is nothing to train
        if svc._replay_now is None and svc.telemetry.evaluation.versions:
            # Devices evaluate: give them a moment to score the final model.
            svc._final_at = svc.clock()
            return
        svc.done.set()
        svc._stopping.set()
        return
    svc._open_round(now)
