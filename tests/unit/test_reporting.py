"""Rate-limited operator lines: rejection summaries and the below-quorum warning (fake clock)."""

from __future__ import annotations

import logging

import pytest

from aggregator.reporting import Reporter
from aggregator.service import AggregatorService
from fedmq.config import AggregatorConfig, LimitsConfig, ModelConfig, RoundsConfig
from fedmq.memory_transport import MemoryTransport
from fedmq.topics import Topics
from fedmq.transport import Message


def waiting(r: Reporter, now: float, accepted: int = 0) -> None:
    r.tick(now, round_=3, accepted=accepted, quorum=2, deadline=100.0, waiting=True)


def test_rejections_are_one_summary_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="aggregator.service")
    r = Reporter(reject_every_s=60.0, idle_warn_s=30.0)
    r.tick(0.0, round_=1, accepted=0, quorum=2, deadline=None, waiting=False)
    for i in range(9000):
        r.rejected("malformed" if i % 3 else "stale", f"d{i}", f"u{i}", "bad bytes")
    r.tick(59.0, round_=1, accepted=0, quorum=2, deadline=None, waiting=False)
    assert not [rec for rec in caplog.records if rec.levelno == logging.INFO]  # not yet
    assert len([rec for rec in caplog.records if rec.levelno == logging.DEBUG]) == 9000
    r.tick(60.0, round_=1, accepted=0, quorum=2, deadline=None, waiting=False)
    info = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.INFO]
    assert len(info) == 1
    assert "rejected 9000 update messages in the last 60 s (6000 malformed, 3000 stale)" in info[0]
    assert "latest: malformed from d8999: bad bytes" in info[0]
    r.tick(200.0, round_=1, accepted=0, quorum=2, deadline=None, waiting=False)
    assert len([rec for rec in caplog.records if rec.levelno == logging.INFO]) == 1


def test_below_quorum_with_nothing_received_warns_once_per_interval(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aggregator.service")
    r = Reporter(reject_every_s=60.0, idle_warn_s=30.0)
    waiting(r, 0.0)
    waiting(r, 29.0)
    assert r.idle_warnings == 0
    waiting(r, 30.0)
    assert r.idle_warnings == 1
    assert caplog.records[-1].getMessage() == (
        "round 3 waiting for updates: 0/2 of its quorum in, nothing received since it "
        "started, deadline in 70 s")
    waiting(r, 45.0)
    assert r.idle_warnings == 1
    r.received(50.0)
    waiting(r, 79.0, accepted=1)
    assert r.idle_warnings == 1
    waiting(r, 80.0, accepted=1)
    assert r.idle_warnings == 2
    assert "1/2 of its quorum in, nothing received for 30 s" in caplog.records[-1].getMessage()
    # Not waiting (quorum in, or no round open): no warning however long it is quiet.
    r.tick(500.0, round_=3, accepted=2, quorum=2, deadline=100.0, waiting=False)
    assert r.idle_warnings == 2


def test_service_warns_while_a_round_waits(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="aggregator.service")
    now = [1000.0]
    config = AggregatorConfig(
        federation="idle", model=ModelConfig(layers=[4, 3], seed=0),
        rounds=RoundsConfig(min_updates=2, max_updates=2, deadline_s=600.0, idle_warn_s=30.0),
        limits=LimitsConfig())
    agg = AggregatorService(config, MemoryTransport(), clock=lambda: now[0])
    agg.start(connect_timeout=0.0)
    agg.stop()
    for t in (1000.0, 1010.0, 1029.0):
        now[0] = t
        agg.step()
    assert agg.reporter.idle_warnings == 0
    now[0] = 1031.0
    agg.step(Message(Topics("idle").update("x"), b"\x00", qos=1))  # arrives, is rejected
    now[0] = 1060.0
    agg.step()
    assert agg.reporter.idle_warnings == 0
    now[0] = 1061.5
    agg.step()
    assert agg.reporter.idle_warnings == 1
    assert "round 1 waiting for updates: 0/2" in caplog.records[-1].getMessage()


def test_a_short_silence_below_quorum_is_one_info_line_within_5_s(
        caplog: pytest.LogCaptureFixture) -> None:
    # Issue 10: an aggregator waiting for a second update said nothing for minutes.
    caplog.set_level(logging.INFO, logger="aggregator.service")
    r = Reporter(reject_every_s=60.0, idle_warn_s=30.0)
    r.received(0.0)
    waiting(r, 4.9, accepted=1)
    assert not caplog.records
    waiting(r, 5.0, accepted=1)
    waiting(r, 9.0, accepted=1)
    assert [rec.getMessage() for rec in caplog.records] == [
        "round 3 waiting: 1/2 updates, deadline in 95 s"]
    r.received(10.0)  # something arrived: the next quiet spell is said again
    waiting(r, 15.0, accepted=1)
    assert len(caplog.records) == 2
