"""Fuzz: hostile secure-aggregation messages through the aggregator service, in every phase.

A fleet (``tests/unit/secagg_fleet.py``) runs ROUNDS secure rounds through an
``AggregatorService``; after each real message the aggregator handled, hostile ones derived
from it and from everything sent before (byte mutants, truncations, other devices' topics,
other steps' topics, replays, half chunks, other rounds, garbage) are handed to the service too.
Each must be counted exactly once, as a rejection with a ``secagg_`` reason or as a late answer,
never logged, never raise; and the models must be those of the clean run, bit for bit.
"""

from __future__ import annotations

import importlib
import random
import sys
from pathlib import Path

import numpy as np

from fedmq.memory_transport import MemoryHub
from fedmq.secagg import codec as sa_codec
from fedmq.secagg.messages import SecAggMasked, SecAggTopics
from fedmq.transport import Message

# tests/unit is not a package: import its secagg_fleet.py by path, as the drills import theirs.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
fleets = importlib.import_module("secagg_fleet")

T = SecAggTopics(fleets.FED)
STEPS = ("keys", "shares", "masked", "reveal")


def hostile(rnd: random.Random, msg: Message, devices: list[str]) -> list[Message]:
    """Messages derived from ``msg`` (already accepted) that must all be refused."""
    raw = msg.payload
    out: list[bytes | tuple[str, bytes]] = []
    for _ in range(3):
        b = bytearray(raw)
        for _ in range(rnd.randint(1, 3)):
            op, pos = rnd.randrange(3), rnd.randrange(len(b))
            if op == 0:
                b[pos] ^= 1 << rnd.randrange(8)
            elif op == 1:
                del b[pos]
            else:
                b.insert(pos, rnd.randrange(256))
        out.append(bytes(b))
    out.append(raw[: rnd.randrange(len(raw))])  # truncated
    out.append(raw)  # redelivered
    step, device = T.device_of(msg.topic) or ("keys", "d0")
    other = rnd.choice([d for d in devices if d != device])
    out.append((f"{T.base}/{step}/{other}", raw))  # another device's topic
    out.append((f"{T.base}/{rnd.choice([s for s in STEPS if s != step])}/{device}", raw))
    out.append((f"{T.base}/{step}/{device}/extra", raw))
    out.append((f"{T.base}/{step}/", raw))
    out.append(b"\x93\x01\x02")  # a msgpack array
    m = sa_codec.decode(raw)
    if isinstance(m, SecAggMasked) and len(m.data) > 4:
        half = SecAggMasked(m.federation, m.run, m.round, m.device, m.offset, m.size,
                            bytes(m.data)[4:])
        out.append(sa_codec.encode(half))  # overlaps what was added
    return [Message(*o, qos=1) if isinstance(o, tuple) else Message(msg.topic, o, qos=1)
            for o in out]


def test_hostile_secagg_messages_are_counted_and_change_nothing(tmp_path: Path) -> None:
    hub = MemoryHub()
    clean = fleets.aggregator(tmp_path / "clean", hub)
    fleets.drive(clean, fleets.Fleet(hub))
    hub = MemoryHub()
    fleet = fleets.Fleet(hub)
    agg = fleets.aggregator(tmp_path / "fuzz", hub)
    assert agg.secagg is not None
    rnd = random.Random(3)
    sent = [0]

    def attack(real: Message) -> None:
        assert agg.secagg is not None
        for bad in hostile(rnd, real, fleet.ids):
            before = sum(agg.stats.rejected.values()) + agg.secagg.late
            assert agg.wal is not None
            logged = agg.wal.appended
            agg.step(bad)
            sent[0] += 1
            after = sum(agg.stats.rejected.values()) + agg.secagg.late
            assert after == before + 1, (bad.topic, bad.payload[:40])
            assert agg.wal.appended - logged <= 1  # at most its (lazy) rejection record

    fleets.drive(agg, fleet, after=attack)
    assert sent[0] > 500
    reasons = set(agg.stats.rejected)
    assert all(r.startswith("secagg_") for r in reasons)
    assert {"secagg_malformed", "secagg_duplicate", "secagg_wrong_device",
            "secagg_wrong_phase"} <= reasons
    print(f"\n{sent[0]} hostile messages; reasons: {dict(sorted(agg.stats.rejected.items()))};"
          f" late: {agg.secagg.late}")
    for name, value in clean.model.items():
        np.testing.assert_array_equal(agg.model[name], value)
    assert agg.version == clean.version
    for a in (clean, agg):
        assert a.wal is not None
        a.wal.close()
