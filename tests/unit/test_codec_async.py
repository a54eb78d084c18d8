"""Hostile input for asynchronous rounds: the announcement's ``mode`` and ``max_staleness`` and an
update's ``base_version`` are fuzzed like the other fields (test_codec.py); the decoder only ever
raises ``DecodeError``, an agent only counts a bad announcement, and an async aggregator rejects
a bad update with exactly one counted reason and folds nothing."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_codec import GOLDEN_BYTES, MSGPACK_VALUES, _decodes_or_rejects, _raw

from aggregator.service import REJECT_REASONS, AggregatorService
from device_agent.agent import AgentMachine
from device_agent.service import AgentService
from device_agent.trainers import MLPTrainer
from fedmq import codec, compression
from fedmq.codec import decode, encode
from fedmq.config import AggregatorConfig, ModelConfig, RobustConfig, RoundsConfig
from fedmq.errors import DecodeError
from fedmq.memory_transport import MemoryHub, MemoryTransport
from fedmq.topics import Topics
from fedmq.transport import Message
from fedmq.wire import ROUND_MODES, ModelUpdate, RoundAnnouncement

MAX_INT = (1 << 63) - 1


def _announcement(**changes: Any) -> bytes:
    raw = _raw("round")
    raw.update(changes)
    return bytes(msgpack.packb(raw, use_bin_type=True))


@pytest.mark.parametrize("mode", ROUND_MODES)
@pytest.mark.parametrize("max_staleness", [0, 1, MAX_INT])
def test_mode_and_max_staleness_round_trip(mode: str, max_staleness: int) -> None:
    ann = codec.decode_as(_announcement(mode=mode, max_staleness=max_staleness),
                          RoundAnnouncement)
    assert (ann.mode, ann.max_staleness) == (mode, max_staleness)
    assert decode(encode(ann)) == ann


def test_a_sync_announcement_leaves_the_new_fields_out() -> None:
    """Older agents read today's sync announcements byte for byte as before."""
    ann = codec.decode_as(GOLDEN_BYTES["round"], RoundAnnouncement)
    assert (ann.mode, ann.max_staleness) == ("sync", 0)
    assert encode(ann) == GOLDEN_BYTES["round"]


@pytest.mark.parametrize(("field", "value"), [
    ("mode", "ASYNC"), ("mode", ""), ("mode", "buffered"), ("mode", 1), ("mode", None),
    ("mode", b"async"), ("mode", ["async"]), ("max_staleness", -1),
    ("max_staleness", MAX_INT + 1), ("max_staleness", 1.5), ("max_staleness", 2.0),
    ("max_staleness", True), ("max_staleness", "3"), ("max_staleness", None),
])
def test_bad_mode_or_max_staleness_is_malformed(field: str, value: Any) -> None:
    with pytest.raises(DecodeError) as info:
        decode(_announcement(**{field: value}))
    assert info.value.reason == "malformed"


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_random_mode_and_max_staleness_only_raise_decode_error(data: st.DataObject) -> None:
    raw = _raw("round")
    raw.update(data.draw(st.dictionaries(
        st.sampled_from(["mode", "max_staleness", "base_version"]),
        MSGPACK_VALUES | st.sampled_from(ROUND_MODES) | st.integers(-2, 40), max_size=3)))
    payload = msgpack.packb(raw, use_bin_type=True)
    _decodes_or_rejects(payload)
    # An agent given the same bytes counts them or acts on them; it never raises.
    service = AgentService("demo", "d", _trainer(), MemoryTransport(), clock=lambda: 0.0)
    service.handle_message(Message(Topics("demo").round, payload, qos=1))
    service.tick()


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_random_base_versions_only_raise_decode_error(data: st.DataObject) -> None:
    raw = _raw("update")
    raw["base_version"] = data.draw(MSGPACK_VALUES | st.integers(-(1 << 63), (1 << 64) - 1))
    _decodes_or_rejects(msgpack.packb(raw, use_bin_type=True))


def _trainer() -> MLPTrainer:
    rng = np.random.default_rng(0)
    return MLPTrainer(rng.normal(size=(6, 4)).astype(np.float32), rng.integers(0, 3, 6),
                      num_classes=3)


def test_agent_ignores_async_announcements_it_cannot_use() -> None:
    m = AgentMachine("demo", "d")
    ann = codec.decode_as(_announcement(mode="async", max_staleness=0), RoundAnnouncement)
    assert m.on_round(ann) == []
    assert m.on_tick(0.0) == []  # no model held: nothing to train from


# ---------------------------------------------------------------- the aggregator

FED = "hostile"
SHAPES = {"dense0.weight": (4, 3), "dense0.bias": (3,)}
#: A hostile base_version and the reason it must be counted under.
BAD_BASES: list[tuple[Any, str]] = [
    (-1, "malformed"), (MAX_INT + 1, "malformed"), ((1 << 64) - 1, "malformed"), (1.0, "malformed"),
    (True, "malformed"), ("0", "malformed"), (None, "malformed"), ([0], "malformed"),
    (b"\x00", "malformed"), (3, "unknown_round"), (MAX_INT, "unknown_round"),
]


def _aggregator() -> AggregatorService:
    config = AggregatorConfig(
        federation=FED, model=ModelConfig(layers=[4, 3], seed=0),
        rounds=RoundsConfig(mode="async", buffer_size=4, max_staleness=1, min_updates=1,
                            deadline_s=600.0, max_rounds=0),
        robust=RobustConfig(mode="off"))
    agg = AggregatorService(config, MemoryTransport(MemoryHub()), clock=lambda: 50.0)
    agg.start()
    agg.stop()
    return agg


def _update_raw(device: str, base: Any, round_: int = 1) -> bytes:
    delta = {k: np.full(s, 0.25, np.float32) for k, s in SHAPES.items()}
    u = ModelUpdate(federation=FED, device_id=device, round=round_, base_version=0,
                    update_id=f"u-{device}", num_examples=2,
                    tensors=compression.encode_all(delta))
    raw = msgpack.unpackb(encode(u))
    raw["base_version"] = base
    return bytes(msgpack.packb(raw, use_bin_type=True))


def test_hostile_base_versions_are_rejected_once_each_and_fold_nothing() -> None:
    agg = _aggregator()
    topics = Topics(FED)
    for i, (base, _) in enumerate(BAD_BASES):
        agg.step(Message(topics.update(f"d{i}"), _update_raw(f"d{i}", base), qos=1))
    expected: dict[str, int] = {}
    for _, reason in BAD_BASES:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(agg.stats.rejected) == expected
    assert set(expected) <= set(REJECT_REASONS)
    assert agg.machine.accepted == 0
    assert agg.strategy.contributors == 0
    # Two versions on, a base two versions back is stale; one version back still counts.
    for v in range(2):
        for j in range(4):
            device = f"fill{v}{j}"
            agg.step(Message(topics.update(device), _update_raw(device, v, v + 1), qos=1))
    assert agg.version == 2
    agg.step(Message(topics.update("late"), _update_raw("late", 0, 1), qos=1))
    assert agg.stats.rejected["stale"] == 1
    agg.step(Message(topics.update("ok"), _update_raw("ok", 1, 2), qos=1))
    assert agg.machine.accepted == 1
