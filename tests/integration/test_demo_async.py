"""`fedmq demo --mode async` over Mosquitto: buffers of half the devices, slow devices folded
late (or not at all), and per version the wall-clock time since the start and the accuracy
(what `scripts/bench learning` reads for wall time to target)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.broker
@pytest.mark.slow
def test_demo_in_async_mode(tmp_path: Path) -> None:
    out = tmp_path / "async.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "demo", "--mode", "async", "--devices", "6",
         "--rounds", "5", "--broker", "mosquitto", "--slow-fraction", "0.34",
         "--slow-factor", "5", "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(out.read_text())
    assert data["mode"] == "async"
    rounds = data["rounds"]
    assert [r["version"] for r in rounds] == [1, 2, 3, 4, 5]
    # A buffer is half the devices: 3 updates, or fewer when its deadline published it.
    assert all(1 <= r["participants"] <= 3 for r in rounds)
    elapsed = [r["elapsed_s"] for r in rounds]
    assert elapsed == sorted(elapsed)
    assert elapsed[0] > 0
    assert all(0.0 < r["accuracy"] <= 1.0 for r in rounds)
    assert data["final_accuracy"] > 0.5
