"""Every rejection reason, sent through a real Mosquitto: counted, aggregator alive, model intact.

Each case publishes one bad payload, then two valid updates from other devices. The round must
close on the two valid ones, the summary must count the bad one under its reason, and the new
model must equal the FedAvg of the two valid updates alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import msgpack
import numpy as np
import pytest

from fedmq.broker import MosquittoBroker
from fedmq.config import LimitsConfig
from fedmq.wire import GlobalModel, RoundSummary

from fedhelpers import (
    Recorder,
    aggregator_config,
    assert_fedavg,
    broker_config,
    random_delta,
    running_aggregator,
    unique_federation,
    update_payload,
)

MAX_BYTES = 16 * 1024

# (reason, builder(federation, base model) -> (device in the topic, payload))
Case = Callable[[str, GlobalModel], tuple[str, bytes]]


def _delta(base: GlobalModel, value: float = 0.01) -> dict[str, np.ndarray]:
    return {t.name: np.full(t.shape, value, np.float32) for t in base.tensors}


def _malformed(fed: str, base: GlobalModel) -> tuple[str, bytes]:
    return "bad", b"\x93not msgpack at all\xc1"


def _truncated(fed: str, base: GlobalModel) -> tuple[str, bytes]:
    return "bad", update_payload(fed, "bad", _delta(base))[:-7]


def _oversize(fed: str, base: GlobalModel) -> tuple[str, bytes]:
    # A valid update padded with an unknown field past the aggregator's byte limit.
    raw = msgpack.unpackb(update_payload(fed, "bad", _delta(base)))
    raw["padding"] = b"\0" * (MAX_BYTES + 1)
    return "bad", msgpack.packb(raw, use_bin_type=True)


def _wrong_shape(fed: str, base: GlobalModel) -> tuple[str, bytes]:
    delta = _delta(base)
    first = next(iter(delta))
    delta[first] = np.zeros((2, 2), np.float32)
    return "bad", update_payload(fed, "bad", delta)


def _missing_tensor(fed: str, base: GlobalModel) -> tuple[str, bytes]:
    delta = _delta(base)
    delta.pop(next(iter(delta)))
    return "bad", update_payload(fed, "bad", delta)


def _non_finite(fed: str, base: GlobalModel) -> tuple[str, bytes]:
    delta = _delta(base)
    last = list(delta)[-1]
    delta[last].flat[-1] = np.nan
    return "bad", update_payload(fed, "bad", delta)


def _infinite(fed: str, base: GlobalModel) -> tuple[str, bytes]:
    delta = _delta(base)
    delta[next(iter(delta))].flat[0] = np.inf
    return "bad", update_payload(fed, "bad", delta)


def _stale_base(fed: str, base: GlobalModel) -> tuple[str, bytes]:
    return "bad", update_payload(fed, "bad", _delta(base), base_version=7)


def _stale_round(fed: str, base: GlobalModel) -> tuple[str, bytes]:
    return "bad", update_payload(fed, "bad", _delta(base), round_=0)


def _future_round(fed: str, base: GlobalModel) -> tuple[str, bytes]:
    return "bad", update_payload(fed, "bad", _delta(base), round_=5)


def _wrong_federation(fed: str, base: GlobalModel) -> tuple[str, bytes]:
    return "bad", update_payload("someone-else", "bad", _delta(base))


def _wrong_device(fed: str, base: GlobalModel) -> tuple[str, bytes]:
    return "bad", update_payload(fed, "impostor", _delta(base))


def _zero_weight(fed: str, base: GlobalModel) -> tuple[str, bytes]:
    return "bad", update_payload(fed, "bad", _delta(base), num_examples=0)


def _huge_weight(fed: str, base: GlobalModel) -> tuple[str, bytes]:
    return "bad", update_payload(fed, "bad", _delta(base), num_examples=10**12)


CASES: list[tuple[str, str, Case]] = [
    ("malformed", "malformed", _malformed),
    ("truncated", "malformed", _truncated),
    ("oversize", "oversize", _oversize),
    ("wrong_shape", "wrong_shape", _wrong_shape),
    ("missing_tensor", "wrong_shape", _missing_tensor),
    ("nan", "non_finite", _non_finite),
    ("inf", "non_finite", _infinite),
    ("stale_base_version", "stale", _stale_base),
    ("stale_round", "stale", _stale_round),
    ("future_round", "unknown_round", _future_round),
    ("wrong_federation", "wrong_federation", _wrong_federation),
    ("wrong_device", "wrong_device", _wrong_device),
    ("zero_examples", "invalid_weight", _zero_weight),
    ("too_many_examples", "invalid_weight", _huge_weight),
]


@pytest.mark.broker
@pytest.mark.parametrize(("reason", "build"), [pytest.param(r, b, id=i) for i, r, b in CASES])
def test_bad_update_is_counted_and_harmless(
    mosquitto: MosquittoBroker, reason: str, build: Case
) -> None:
    fed = unique_federation("rej")
    broker = broker_config(mosquitto)
    rec = Recorder(broker, fed).start()
    config = aggregator_config(
        broker, fed, limits=LimitsConfig(max_update_bytes=MAX_BYTES, max_examples=1000,
                                         weight_mode="reject")
    )
    try:
        with running_aggregator(config) as agg:
            rec.wait_for(lambda r: 0 in r.models())
            base = rec.models()[0]
            device, bad = build(fed, base)
            rec.transport.publish(rec.topics.update(device), bad)
            rng = np.random.default_rng(3)
            for dev, n in (("good-a", 10), ("good-b", 30)):
                rec.transport.publish(
                    rec.topics.update(dev),
                    update_payload(fed, dev, random_delta(base, rng), num_examples=n),
                )
            rec.wait_for(lambda r: 1 in r.models() and bool(r.summaries()))
            assert agg.done.is_set(), "the round did not close"
        summary: RoundSummary = rec.summaries()[0]
        assert summary.rejected == {reason: 1}
        assert summary.participants == 2
        good = [u for u in rec.updates().values() if u.device_id.startswith("good-")]
        assert sorted(u.update_id for u in good) == sorted(uid for _, uid in summary.accepted)
        assert_fedavg(rec.models()[1], base, good)
    finally:
        rec.stop()


@pytest.mark.broker
def test_duplicate_update_is_counted_once(mosquitto: MosquittoBroker) -> None:
    """A device's second update in a round (new id, or the same one redelivered) is ignored."""
    fed = unique_federation("dup")
    broker = broker_config(mosquitto)
    rec = Recorder(broker, fed).start()
    try:
        with running_aggregator(aggregator_config(broker, fed)):
            rec.wait_for(lambda r: 0 in r.models())
            base = rec.models()[0]
            rng = np.random.default_rng(5)
            first = update_payload(fed, "dev-a", random_delta(base, rng), update_id="a-1")
            rec.transport.publish(rec.topics.update("dev-a"), first)
            rec.transport.publish(rec.topics.update("dev-a"), first)  # a QoS 1 redelivery
            rec.transport.publish(
                rec.topics.update("dev-a"),
                update_payload(fed, "dev-a", random_delta(base, rng), update_id="a-2"),
            )
            time.sleep(0.2)
            rec.transport.publish(
                rec.topics.update("dev-b"),
                update_payload(fed, "dev-b", random_delta(base, rng), update_id="b-1"),
            )
            rec.wait_for(lambda r: 1 in r.models() and bool(r.summaries()))
        summary = rec.summaries()[0]
        assert summary.rejected == {"duplicate": 2}
        assert sorted(summary.accepted) == [("dev-a", "a-1"), ("dev-b", "b-1")]
        updates = rec.updates()
        assert_fedavg(rec.models()[1], base, [updates["a-1"], updates["b-1"]])
    finally:
        rec.stop()
