"""Federated evaluation's bookkeeping (aggregator/evaluation.py) and its rate-limited publishing
(aggregator/telemetry.py), with the in-memory transport."""

from __future__ import annotations

import pytest

from aggregator.evaluation import FederatedEvaluation
from aggregator.ledger import Stats
from aggregator.publishing import Publisher
from aggregator.telemetry import EVERY_S, Telemetry
from fedmq import codec
from fedmq.config import AggregatorConfig
from fedmq.memory_transport import MemoryHub, MemoryTransport
from fedmq.topics import Topics
from fedmq.wire import Evaluation, ModelEvaluation, RoundProgress


def report(device: str, version: int, n: int, acc: float, loss: float = 1.0, *,
           run: int = 5, fed: str = "f") -> Evaluation:
    return Evaluation(federation=fed, device_id=device, version=version, num_examples=n,
                      metrics={"accuracy": acc, "loss": loss}, run=run)


def test_means_are_weighted_by_examples_and_capped() -> None:
    ev = FederatedEvaluation("f", max_examples=100)
    ev.published(5, 2)
    assert ev.add(report("a", 2, 10, 1.0, 0.5), "a")[1] == ""
    assert ev.add(report("b", 2, 30, 0.5, 1.5), "b")[1] == ""
    entry, _ = ev.add(report("c", 2, 1000, 0.0, 3.0), "c")  # counts as 100 (the cap)
    assert entry is not None
    means = entry.means()
    assert means["eval_accuracy"] == pytest.approx((10 * 1.0 + 30 * 0.5) / 140)
    assert means["eval_loss"] == pytest.approx((10 * 0.5 + 30 * 1.5 + 100 * 3.0) / 140)
    assert means["eval_examples"] == 140
    assert means["eval_devices"] == 3


@pytest.mark.parametrize(("msg", "device", "reason"), [
    (report("a", 2, 10, 0.9), "a", "duplicate"),
    (report("x", 2, 10, 0.9), "a", "wrong_device"),
    (report("a", 2, 10, 0.9, fed="other"), "a", "wrong_federation"),
    (report("b", 3, 10, 0.9), "b", "unknown_version"),  # not published yet
    (report("b", 2, 10, 0.9, run=4), "b", "unknown_version"),  # another run
    (report("b", 2, 0, 0.9), "b", "invalid_weight"),
    (Evaluation("f", "b", 2, 10, {}, run=5), "b", "malformed"),
])
def test_reports_not_counted_say_why(msg: Evaluation, device: str, reason: str) -> None:
    ev = FederatedEvaluation("f", max_examples=100)
    ev.published(5, 2)
    ev.add(report("a", 2, 10, 0.9), "a")
    assert ev.add(msg, device) == (None, reason)
    assert ev.versions[2].examples == 10  # nothing of the refused one counted


def test_old_versions_age_out_and_a_new_run_starts_over() -> None:
    ev = FederatedEvaluation("f", max_examples=100, keep=3)
    ev.published(5, 0)
    ev.add(report("a", 0, 10, 0.5), "a")
    for v in range(1, 4):
        ev.published(5, v)
    assert 0 not in ev.versions
    assert ev.add(report("b", 0, 10, 0.5), "b") == (None, "unknown_version")
    ev.add(report("a", 3, 10, 0.5), "a")
    ev.published(6, 0)
    assert ev.versions == {}
    assert ev.latest() is None


def test_restore_continues_the_stored_means() -> None:
    ev = FederatedEvaluation("f", max_examples=100)
    ev.published(5, 1)
    ev.restore(1, {"eval_accuracy": 0.8, "eval_loss": 0.4, "eval_examples": 20.0,
                   "eval_devices": 2.0, "participants": 3.0})
    entry, _ = ev.add(report("c", 1, 20, 0.6, 0.8), "c")
    assert entry is not None
    assert entry.means()["eval_accuracy"] == pytest.approx(0.7)
    assert entry.means()["eval_loss"] == pytest.approx(0.6)
    assert entry.means()["eval_examples"] == 40


def _telemetry() -> tuple[Telemetry, MemoryHub, Stats]:
    hub = MemoryHub()
    transport = MemoryTransport(hub)
    config = AggregatorConfig(federation="f")
    stats = Stats()
    publisher = Publisher(config, transport, Topics("f"), None)
    return Telemetry("f", publisher, stats, max_examples=100), hub, stats


def test_telemetry_publishes_at_most_once_a_second_unless_a_version_is_complete() -> None:
    tel, hub, stats = _telemetry()
    watcher = MemoryTransport(hub)
    watcher.subscribe("fedmq/v1/f/metrics/#")
    watcher.start()
    tel.published(5, 1)
    tel.expected = 3
    for i, device in enumerate("ab"):
        tel.report(codec.encode(report(device, 1, 10, 0.5 + i / 10)), device)
    tel.flush(100.0)
    tel.report(codec.encode(report("z", 1, 10, 0.9)), "zz")  # topic id differs: not counted
    tel.report(b"\x01garbage", "q")
    assert stats.eval_rejected == {"wrong_device": 1, "malformed": 1}
    tel.flush(100.0 + EVERY_S / 2)  # nothing new: nothing sent
    tel.report(codec.encode(report("c", 1, 10, 0.3)), "c")  # all 3 in: sent at once
    tel.flush(100.0 + EVERY_S / 2)
    sent = [codec.decode(m.payload) for m in watcher.inbox.queue]
    evals = [m for m in sent if isinstance(m, ModelEvaluation)]
    assert [(e.version, e.devices) for e in evals] == [(1, 2), (1, 3)]
    assert evals[-1].metrics["eval_accuracy"] == pytest.approx((0.5 + 0.6 + 0.3) / 3)
    assert stats.eval_reports == 3
    kept = hub.retained["fedmq/v1/f/metrics/eval"]  # a new dashboard gets the latest at once
    assert codec.decode(kept.payload) == evals[-1]


def test_progress_is_sent_when_it_changes_and_not_more_than_once_a_second() -> None:
    tel, hub, _ = _telemetry()
    watcher = MemoryTransport(hub)
    watcher.subscribe("fedmq/v1/f/metrics/progress")
    watcher.start()
    kw = {"round_": 3, "base_version": 2, "min_updates": 2, "max_updates": 5,
          "deadline": 160.0, "run": 5}
    tel.progress(100.0, accepted=0, rejected={}, **kw)  # type: ignore[arg-type]
    tel.progress(100.2, accepted=1, rejected={}, **kw)  # type: ignore[arg-type]
    tel.progress(101.1, accepted=1, rejected={"stale": 1}, **kw)  # type: ignore[arg-type]
    tel.progress(102.5, accepted=1, rejected={"stale": 1}, **kw)  # type: ignore[arg-type]
    sent = [codec.decode(m.payload) for m in watcher.inbox.queue]
    assert all(isinstance(p, RoundProgress) for p in sent)
    assert [(p.accepted, dict(p.rejected)) for p in sent if isinstance(p, RoundProgress)] == [
        (0, {}), (1, {"stale": 1})]
