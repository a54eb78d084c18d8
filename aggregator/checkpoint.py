"""Checkpoints of the aggregator's state: snapshots at round openings (and within rounds), and
recovery from the last snapshot plus the write-ahead log (``aggregator.wal`` does the file I/O).

Functions of the service rather than methods: they read and restore its whole state, but they
are one responsibility, crash safety, kept apart from the worker's update path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from aggregator.async_rounds import AsyncRoundMachine
from aggregator.chunks import export_pending, restore_pending
from aggregator.history import HistoryError
from aggregator.ledger import RoundLedger
from aggregator.rounds import Tick, UpdateOffered
from aggregator.wal import REJECT, TICK, UPDATE, Snapshot, WriteAheadLog, read_records
from fedmq.errors import ConfigError
from fedmq.transport import Message

if TYPE_CHECKING:
    from aggregator.service import AggregatorService

__all__ = ["due", "recover", "restore_mid", "save"]

log = logging.getLogger("aggregator.service")


def recover(svc: AggregatorService) -> bool:
    """Restore the last snapshot and replay the log; False if there is nothing to restore."""
    if svc.state_dir is None:
        return False
    svc.state_dir.mkdir(parents=True, exist_ok=True)
    snap = Snapshot.load(svc.state_dir)
    if snap is None:
        svc.wal = WriteAheadLog(svc.state_dir, segment=0)
        return False
    meta = snap.meta
    if list(snap.model) != list(svc.spec.names) or any(
            snap.model[n].shape != s for n, s in zip(svc.spec.names, svc.spec.shapes,
                                                      strict=True)):
        raise ConfigError(f"{svc.state_dir}: the saved model does not match [model] in the "
                          "config; point durability.state_dir elsewhere or restore the model")
    svc.model = dict(snap.model)
    _restore_strategy(svc, meta, snap.state)  # before the replay, which may close a round
    svc.run = int(meta.get("run", 0))  # snapshots written before runs existed: 0
    svc.version = int(meta["version"])
    svc.round = int(meta["round"]) - 1
    svc.stats.rounds_completed = int(meta["rounds_completed"])
    svc.publisher.model_parts = int(meta["model_parts"])
    records = list(read_records(svc.state_dir, int(meta["wal_segment"])))
    svc.wal = None  # nothing is logged while the log itself is replayed
    svc._replay_now = float(meta["opened_at"])
    try:
        if svc.privacy is not None:  # before the round reopens: its budget check reads it
            svc.privacy.restore(meta.get("privacy", []))
        svc._publish_model(metrics=_stored_metrics(svc))
        if "result" in meta:  # before the replay, which may close a round and publish anew
            svc.publisher.result_payload(bytes.fromhex(meta["result"]))
        svc._open_round(float(meta["opened_at"]), snapshot=False)
        svc.bound.restore(meta.get("robust", {}))
        if isinstance(svc.machine, AsyncRoundMachine):  # earlier buffers' updates (duplicates)
            svc.machine.restore(meta.get("async", []))
        if "mid" in meta and snap.acc is not None:
            restore_mid(svc, meta["mid"], snap.acc)
        for rec in records:
            svc._replay_now = rec.now
            if rec.kind == UPDATE:
                svc.handle_message(Message(rec.topic, rec.payload, qos=0))
            elif rec.kind == TICK:
                svc._tick()
            elif rec.kind == REJECT:
                svc._count_rejection(rec.topic)
            else:  # a scale-out worker's own records (its coordinator's collect)
                svc.replay_record(rec.kind, rec.topic, rec.payload)
    finally:
        svc._replay_now = None
    svc.wal = WriteAheadLog(svc.state_dir, segment=int(meta["wal_segment"]))
    log.warning("recovered round %d on model version %d from %s: replayed %d logged events",
                svc.round, svc.version, svc.state_dir, len(records))
    return True


def _restore_strategy(svc: AggregatorService, meta: Mapping[str, Any],
                      state: Mapping[str, npt.NDArray[np.float64]]) -> None:
    """The server optimizer's state as the snapshot has it. After a change of ``[strategy]
    name`` the new optimizer starts afresh (the old one's moments mean nothing to it)."""
    saved = meta.get("strategy", "fedavg")  # snapshots written before there was a choice
    if saved != svc.strategy.name:
        log.warning("%s was written with [strategy] name = %r, the config says %r: the new "
                    "strategy starts with a fresh optimizer state", svc.state_dir, saved,
                    svc.strategy.name)
        return
    try:
        svc.strategy.load_state(state)
    except ValueError as exc:
        raise ConfigError(f"{svc.state_dir}: the saved optimizer state does not fit the "
                          f"model: {exc}") from None


def _stored_metrics(svc: AggregatorService) -> dict[str, float]:
    """The recovered version's metrics as the history holds them (republished with it, so the
    retained model and the history keep them); the stored evaluations of recent versions are
    taken back, so later reports add to them."""
    if svc.history is None:
        return {}
    svc.telemetry.published(svc.run, svc.version)
    for version in svc.history.versions()[-svc.telemetry.evaluation.keep:]:
        svc.telemetry.restore(version, svc.history.stored_eval(version))
    try:
        model = svc.history.load(svc.version)
    except HistoryError as exc:
        log.warning("the metrics of model version %d are not in the history (%s): "
                    "republished without them", svc.version, exc)
        return {}
    return {k: v for k, v in model.metrics.items() if not k.startswith("eval_")}


def due(svc: AggregatorService) -> bool:
    d = svc.config.durability
    if (svc.wal is None or svc._replay_now is not None or not svc._since_snapshot
            or svc.holding()):  # held updates are in no snapshot: the log keeps them
        return False
    return bool((d.snapshot_every_updates and svc._since_snapshot
                 >= d.snapshot_every_updates)
                or (d.snapshot_every_s and svc.clock() - svc._snapshot_at
                    >= d.snapshot_every_s))


def save(svc: AggregatorService, opened_at: float, mid: bool = False) -> None:
    """Save the state (at the round opening, or ``mid`` round) and start a new log segment."""
    assert svc.state_dir is not None
    assert svc.wal is not None
    svc.wal.sync()
    segment = svc.wal.segment + 1
    meta: dict[str, Any] = {
        "version": svc.version, "round": svc.round, "opened_at": opened_at,
        "rounds_completed": svc.stats.rounds_completed,
        "model_parts": svc.publisher.model_parts,
        "wal_segment": segment, "federation": svc.config.federation, "run": svc.run,
        "robust": svc.bound.export(), "strategy": svc.strategy.name,
    }
    if isinstance(svc.machine, AsyncRoundMachine):
        meta["async"] = svc.machine.export()
    if svc.privacy is not None:  # the rounds the accountant composed
        meta["privacy"] = svc.privacy.export()
    result = svc.publisher.last_result()
    if result is not None:  # a statistics federation's last result, republished on recovery
        meta["result"] = result.hex()
    acc = None
    if mid:
        acc, total_weight, contributors, parts = svc.strategy.export_state()
        meta["mid"] = svc.ledger.export() | {
            "total_weight": total_weight, "contributors": contributors,
            "open_parts": [[k[0], k[1], w, r] for k, w, r in parts],  # type: ignore[index]
            "pending": export_pending(svc._pending),
            "accepted": svc.stats.accepted,
        }
    Snapshot(svc.model, meta, acc, svc.strategy.state()).save(svc.state_dir)
    svc.wal.rotate(segment)
    svc._since_snapshot = 0
    svc._snapshot_at = svc.clock()


def restore_mid(svc: AggregatorService, mid: Mapping[str, Any],
                acc: npt.NDArray[np.float64]) -> None:
    """Bring a just-reopened round to a mid-round snapshot's state."""
    for ev in mid["events"]:
        if ev[0] == "u":
            svc.machine.handle(UpdateOffered(
                device_id=ev[1], round=svc.round,
                # async updates come from several versions (older snapshots: the round's)
                base_version=ev[4] if len(ev) > 4 else svc.version,
                update_id=ev[2], now=ev[3]))
        else:
            svc.machine.handle(Tick(ev[1]))
    svc.ledger = RoundLedger.restore(mid)
    svc.strategy.import_state(acc, mid["total_weight"], mid["contributors"],
                               [((d, u), w, r) for d, u, w, r in mid["open_parts"]])
    svc._pending = restore_pending(mid["pending"])
    svc._pending_devices = {d for d, _ in svc._pending}
    svc._pending_ids = {u for _, u in svc._pending}
    svc.stats.accepted = int(mid["accepted"])
