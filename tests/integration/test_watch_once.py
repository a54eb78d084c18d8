"""`fedmq watch --once` (what scripts use, and what a pipe gets) against a real Mosquitto."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from fedmq import codec
from fedmq.broker import MosquittoBroker
from fedmq.topics import Topics
from fedmq.transport import PahoTransport
from fedmq.wire import (
    DeviceStatus,
    GlobalModel,
    Message,
    ModelEvaluation,
    RoundAnnouncement,
    RoundProgress,
)

from fedhelpers import broker_config, unique_federation

pytestmark = pytest.mark.broker


def watch_once(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"COLUMNS": "100", "LINES": "30"}
    return subprocess.run([sys.executable, "-m", "fedmq.cli", "watch", "--once", *args],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)


def test_once_prints_the_retained_state(mosquitto: MosquittoBroker) -> None:
    broker = broker_config(mosquitto)
    fed = unique_federation("once")
    t = Topics(fed)
    now = time.time()
    retained: list[tuple[str, Message]] = [
        (t.round, RoundAnnouncement(fed, 7, 6, "sha", now + 45, 4, 8, run=5)),
        (t.progress, RoundProgress(fed, 7, 6, 3, 4, 8, now + 45, {"stale_round": 2}, run=5)),
        (t.model, GlobalModel(fed, 6, 6, (), "sha", metrics={
            "train_accuracy": 0.91, "train_loss": 0.3, "participants": 4.0}, run=5)),
        (t.model_eval, ModelEvaluation(fed, 6, 3, 90, {"eval_accuracy": 0.875,
                                                       "eval_loss": 0.41}, run=5)),
        (t.status("sensor-a"), DeviceStatus(fed, "sensor-a", "training", ts=now - 5)),
        (t.status("sensor-b"), DeviceStatus(fed, "sensor-b", "offline", ts=now - 600)),
    ]
    publisher = PahoTransport(broker, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    publisher.start()
    try:
        assert publisher.wait_connected(10)
        deliveries = [publisher.publish(topic, codec.encode(m), qos=1, retain=True)
                      for topic, m in retained]
        end = time.monotonic() + 10
        while not all(d.done() for d in deliveries) and time.monotonic() < end:
            time.sleep(0.02)
        done = watch_once("--broker", f"{broker.host}:{broker.port}", "--federation", fed)
    finally:
        for topic, _ in retained:  # the fixture's broker is shared by the module
            publisher.publish(topic, b"", qos=1, retain=True)
        publisher.stop()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 30
    assert max(len(line) for line in lines) <= 100
    out = done.stdout
    assert "Round 7" in out
    assert "3/4 updates" in out
    assert "rejected: stale_round 2" in out
    assert "◆ sensor-a" in out
    assert "○ sensor-b" in out
    assert "10 min ago" in out
    assert "87.5% █" in out  # v6 as the devices scored it, not its 91 % training accuracy
    assert "\x1b[" not in out  # no terminal codes into a pipe


def test_once_says_when_the_broker_cannot_be_reached() -> None:
    started = time.monotonic()
    done = watch_once("--broker", "127.0.0.1:1", "--federation", "nowhere", "--exit-after", "1.5")
    assert done.returncode == 1
    assert time.monotonic() - started < 15
    assert "waiting for fedmq/v1/nowhere/round on 127.0.0.1:1" in done.stdout
    assert "cannot reach 127.0.0.1:1: connection refused" in done.stdout
    assert "Traceback" not in done.stderr
