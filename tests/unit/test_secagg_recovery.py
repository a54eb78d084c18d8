"""Secure aggregation through the aggregator service with its write-ahead log: killed after any
message and recovered, it publishes the same models as an uninterrupted run, and nothing in its
state directory holds one device's unmasked update."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedmq.memory_transport import MemoryHub
from fedmq.secagg.fixedpoint import FixedPoint

from secagg_fleet import ROUNDS, Fleet, drive
from secagg_fleet import aggregator as _aggregator


def test_crash_after_any_message_gives_the_same_models(tmp_path: Path) -> None:
    ref_hub = MemoryHub()
    ref_fleet = Fleet(ref_hub)
    reference = _aggregator(tmp_path / "ref", ref_hub)
    total = drive(reference, ref_fleet)
    assert reference.version == ROUNDS
    assert reference.stats.rejected == {}
    for cut in range(1, total, 3):
        hub = MemoryHub()
        fleet = Fleet(hub)
        first = _aggregator(tmp_path / f"s{cut}", hub)
        drive(first, fleet, stop_after=cut)
        assert first.wal is not None
        first.wal.drop()  # kill -9: only what step() synced survives
        unacked = []  # the broker redelivers the last one and what was still queued
        while not first.transport.inbox.empty():
            unacked.append(first.transport.inbox.get())
        first.transport.stop()
        second = _aggregator(tmp_path / f"s{cut}", hub)
        last = first.transport.acked[-1]  # type: ignore[attr-defined]
        for msg in [last, *unacked]:
            second.transport.inbox.put(msg)
        drive(second, fleet)
        assert second.version == ROUNDS
        for name, value in reference.model.items():
            np.testing.assert_array_equal(second.model[name], value, err_msg=f"cut {cut}")
        assert second.wal is not None
        second.wal.close()
    assert reference.wal is not None
    reference.wal.close()


@pytest.mark.parametrize("cut", [20, 50])
def test_state_dir_never_holds_an_unmasked_update(tmp_path: Path, cut: int) -> None:
    hub = MemoryHub()
    fleet = Fleet(hub)
    agg = _aggregator(tmp_path / "s", hub)
    drive(agg, fleet, stop_after=cut)
    assert agg.wal is not None
    agg.wal.sync(force=True)
    stored = b"".join(p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file())
    assert len(stored) > 1000
    assert agg.secagg is not None
    rules = agg.secagg.rules
    fixed = FixedPoint.for_devices(rules.max_devices, rules.clip, rules.weight_cap)
    for (_, _d), (values, w) in fleet.updates.items():
        ring = fixed.encode(values, w).astype("<u4").tobytes()
        for needle in (ring[:32], ring[40:72], values.astype("<f4").tobytes()[:32],
                       values.astype("<f8").tobytes()[:32],
                       (values * fixed.norm_weight(w)).astype("<f4").tobytes()[:32]):
            assert needle not in stored
    agg.wal.close()
