"""``fedmq demo`` stopped by SIGTERM or Ctrl-C (issue 10): one line, no traceback, and the
Mosquitto it started is gone (it used to be orphaned on SIGTERM, with its temp dir left behind)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.broker
@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGTERM, 143, "terminated"),
                                                   (signal.SIGINT, 130, "interrupted")])
def test_demo_stops_cleanly_on_a_signal(sig: signal.Signals, code: int, word: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmq.cli", "demo", "--devices", "3", "--rounds", "500",
         "--broker", "mosquitto"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        line = ""
        while "round   2/" not in line:  # the federation is running
            assert time.monotonic() < deadline, "the demo did not reach round 2"
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the demo exited early"
        brokers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if c.name() == "mosquitto"]
        assert brokers, "the demo runs its own mosquitto"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"fedmq demo: {word}; everything it started is stopped"
    time.sleep(0.5)
    for b in brokers:
        assert not b.is_running() or b.status() == psutil.STATUS_ZOMBIE, "mosquitto orphaned"
