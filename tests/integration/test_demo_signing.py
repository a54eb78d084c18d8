"""`fedmq demo` signs by default (a key made for the run; every device and the watcher verify),
and `--no-signing` publishes unsigned: recorded by an independent client on the broker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedmq.broker import MosquittoBroker
from fedmq.demo import FEDERATION
from fedmq.wire import GlobalModel, RoundAnnouncement

from fedhelpers import Recorder, broker_config

ROOT = Path(__file__).resolve().parents[2]


def _demo(mosquitto: MosquittoBroker, *extra: str) -> tuple[Recorder, str]:
    rec = Recorder(broker_config(mosquitto), FEDERATION).start()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "fedmq.cli", "demo", "--devices", "4", "--rounds", "2",
             "--broker", f"{mosquitto.host}:{mosquitto.port}", *extra],
            env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
            timeout=240, check=False)
        rec.drain()
    finally:
        rec.stop()
    assert run.returncode == 0, run.stdout + run.stderr
    return rec, run.stdout + run.stderr


@pytest.mark.broker
def test_the_demo_signs_and_its_devices_verify(mosquitto: MosquittoBroker) -> None:
    rec, out = _demo(mosquitto)
    heads = [m for m in rec.of(GlobalModel) if m.chunk is None]
    announcements = rec.of(RoundAnnouncement)
    assert [m.version for m in heads][-3:] == [0, 1, 2]
    assert announcements
    published: list[GlobalModel | RoundAnnouncement] = [*heads, *announcements]
    keys = {m.sig.key for m in published if m.sig is not None}
    assert len(keys) == 1, "every model and announcement signed by the one demo key"
    assert all(m.sig is not None for m in published)
    assert "not verified" not in out
    assert "refused" not in out
    assert "final held-out accuracy" in out

    rec, out = _demo(mosquitto, "--no-signing")
    run = max(m.run for m in rec.of(GlobalModel))
    unsigned: list[GlobalModel | RoundAnnouncement] = [*rec.of(GlobalModel),
                                                       *rec.of(RoundAnnouncement)]
    fresh = [m for m in unsigned if m.run == run]
    assert fresh
    assert all(m.sig is None for m in fresh)
