"""``fedmq demo --task statistics`` as a user runs it: its own Mosquitto, river's occupancy
readings, one device per day; its JSON checked against numpy on the csv read here."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
#: The csv's columns, in the demo's names.
SOURCE = {"temperature": "V1", "humidity": "V2", "light": "V3", "CO2": "V4"}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _occupancy() -> Path:
    spec = importlib.util.find_spec("river")
    assert spec is not None, "river is in the dev extra"
    assert spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "drift/datasets/occupancy.csv"


@pytest.mark.broker
@pytest.mark.slow
def test_statistics_demo_equals_numpy_on_the_csv(tmp_path: Path) -> None:
    out = tmp_path / "stats.json"
    run = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "demo", "--task", "statistics", "--broker",
         "mosquitto", "--rounds", "2", "--json", str(out)],
        env=_env(), capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    with _occupancy().open(newline="") as f:
        rows = list(csv.DictReader(f))
    days = sorted({r["time"][:10] for r in rows})
    assert len(rows) == 509
    assert len(days) == 7
    data = json.loads(out.read_text())
    assert data["broker"] == "mosquitto"
    ids = [f"day-{d}" for d in days]
    assert [d["id"] for d in data["devices"]] == ids
    assert [r["devices"] for r in data["rounds"]] == [ids, ids]
    assert data["result_devices"] == ids
    assert list(data["columns"]) == list(SOURCE)
    for name, source in SOURCE.items():
        x = np.array([float(r[source]) for r in rows])
        col = data["columns"][name]
        lo, hi, n = col["edges"][0], col["edges"][-1], len(col["edges"]) - 1
        assert col["count"] == x.size == 509
        assert (col["min"], col["max"]) == (x.min(), x.max())
        assert col["hist"] == np.histogram(x, np.linspace(lo, hi, n + 1))[0].tolist()
        assert (col["underflow"], col["overflow"]) == ((x < lo).sum(), (x > hi).sum())
        assert col["devices"] == 7
        for key, want in (("mean", np.mean(x)), ("variance", np.var(x)),
                          ("sample_variance", np.var(x, ddof=1))):
            assert abs(col[key] - want) / abs(want) < 1e-12, (name, key, col[key], want)
    # The demo prints every column beside numpy's, and says what a device is.
    assert "one device per day of the recording: 7 devices" in run.stdout
    for name in SOURCE:
        assert f"\n{name:<12} fedmq " in run.stdout
    assert run.stdout.count("count, min, max and histogram vs numpy: equal") == 4


def test_statistics_demo_without_river_says_what_to_install() -> None:
    """No river: one line naming the extra, exit 2 (no broker is started)."""
    code = ("import sys; sys.modules['river'] = None; from fedmq.cli import main; "
            "sys.exit(main(['demo', '--task', 'statistics']))")
    run = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, timeout=60, check=False)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "fedmq demo --task statistics needs river's room-occupancy readings (river >= 0.26): "
        "pip install 'fedmq[analytics]'"]
