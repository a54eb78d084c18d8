"""``scripts/bench learning --quick`` over Mosquitto: the four keys come from real runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

KEYS = ("rounds_ratio_fedsgd_over_fedavg", "rounds_ratio_fedavg_over_best_remedy",
        "wall_ratio_sync_over_async", "rss_ratio_500_over_50_devices")


@pytest.mark.broker
@pytest.mark.slow
def test_quick_learning_bench_writes_the_keys_from_its_runs(tmp_path: Path) -> None:
    out, png = tmp_path / "learning.json", tmp_path / "learning.png"
    run = subprocess.run([sys.executable, "-m", "benchmarks", "learning", "--quick",
                          "--json", str(out), "--plot", str(png)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(out.read_text())
    assert set(KEYS) <= set(data)
    cells = {(c["group"], c["method"]): c for c in data["cells"]}

    # FedSGD over FedAvg: the medians of the two cells' runs, each read off its own curve.
    sgd, avg = cells["table2", "FedSGD"], cells["table2", "FedAvg E=5"]
    for cell in (sgd, avg):
        (r,) = cell["runs"]
        curve = r["curve"]
        assert r["rounds_to_target"] == len(curve)  # the demo stopped at the target
        assert max(curve[:-1], default=0.0) < cell["target"] <= curve[-1]
    assert data["rounds_ratio_fedsgd_over_fedavg"] == pytest.approx(
        sgd["median_rounds"] / avg["median_rounds"], rel=1e-3)
    assert data["rounds_ratio_fedsgd_over_fedavg"] > 1  # FedSGD takes one step a round

    # Plain FedAvg over the best remedy that ran; None only if none of them reached 0.90.
    ratio = data["rounds_ratio_fedavg_over_best_remedy"]
    best = cells["remedies", data["best_remedy"]]
    plain = cells["remedies", "FedAvg"]
    assert ratio == pytest.approx(plain["median_rounds"] / best["median_rounds"], rel=1e-3)

    # Sync over async wall time: a number when async ran, else None with the reason recorded.
    asyn = cells["async", "async FedBuff"]
    if asyn["not_run"]:
        assert data["wall_ratio_sync_over_async"] is None
    else:
        sync = cells["async", "sync FedAvg"]
        assert data["wall_ratio_sync_over_async"] == pytest.approx(
            sync["median_wall_s"] / asyn["median_wall_s"], rel=1e-3)

    # Memory: peaks read from /proc, the key is the largest per-strategy ratio.
    per = data["rss_ratio_500_over_50_devices_per_strategy"]
    assert per
    assert data["rss_ratio_500_over_50_devices"] == max(per.values())
    for name, ratio in per.items():
        rss = data["rss"][name]
        assert rss["hwm_kib_small"] > 10_000  # a real process's peak, in KiB
        assert ratio == pytest.approx(rss["hwm_kib_large"] / rss["hwm_kib_small"], abs=1e-3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
