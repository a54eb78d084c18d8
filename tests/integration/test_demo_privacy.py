"""`fedmq demo --noise-multiplier` over Mosquitto: epsilon printed and written each round (the
accountant's value for the rounds so far, checked against dp-accounting used directly), and
`--target-epsilon` ends the run before the round that would pass it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant

from aggregator.privacy import PLD_GRID

ROOT = Path(__file__).resolve().parents[2]


def epsilon(z: float, rounds: int, delta: float = 1e-5) -> float:
    acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_GRID)
    acc.compose(dp_accounting.GaussianDpEvent(z), rounds)  # every device every round: q = 1
    return float(acc.get_epsilon(delta))


def demo(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp_path / "dp.json"
    run = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "demo", "--devices", "6", "--broker", "mosquitto",
         "--noise-multiplier", "1.0", "--clip-norm", "2", "--json", str(out), *extra],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=240, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    return run, json.loads(out.read_text())


@pytest.mark.broker
@pytest.mark.slow
def test_demo_prints_and_writes_epsilon_each_round(tmp_path: Path) -> None:
    run, data = demo(tmp_path, "--rounds", "4")
    rounds = data["rounds"]
    assert isinstance(rounds, list)
    assert [r["version"] for r in rounds] == [1, 2, 3, 4]
    for r in rounds:
        assert r["epsilon"] == pytest.approx(epsilon(1.0, r["version"]), rel=1e-9)
        assert r["clipped"] >= 0
    assert data["final_epsilon"] == rounds[-1]["epsilon"]
    assert data["noise_multiplier"] == 1.0
    printed = [float(x) for x in re.findall(r"epsilon (\d+\.\d+) ", run.stdout)]
    assert printed[:4] == [round(r["epsilon"], 3) for r in rounds]
    assert "differential privacy: epsilon" in run.stdout


@pytest.mark.broker
@pytest.mark.slow
def test_demo_stops_at_the_target_epsilon(tmp_path: Path) -> None:
    target = (epsilon(1.0, 3) + epsilon(1.0, 4)) / 2
    run, data = demo(tmp_path, "--rounds", "10", "--target-epsilon", f"{target:.6f}")
    rounds = data["rounds"]
    assert isinstance(rounds, list)
    assert len(rounds) == 3
    assert data["final_epsilon"] == pytest.approx(epsilon(1.0, 3), rel=1e-9)
    assert data["final_epsilon"] <= target
    assert "stopped at --target-epsilon" in run.stdout


def test_demo_refuses_bad_privacy_options(tmp_path: Path) -> None:
    for args, says in ((["--noise-multiplier", "-1"], "--noise-multiplier -1.0 must be"),
                       (["--noise-multiplier", "nan"], "--noise-multiplier nan must be"),
                       (["--target-epsilon", "3"], "--target-epsilon needs --noise-multiplier"),
                       (["--noise-multiplier", "1", "--target-epsilon", "0"],
                        "--target-epsilon 0.0 must be"),
                       (["--noise-multiplier", "1", "--delta", "1"], "--delta 1.0 must be"),
                       (["--noise-multiplier", "1", "--mode", "async"], "sync only")):
        run = subprocess.run([sys.executable, "-m", "fedmq.cli", "demo", *args],
                             env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                             text=True, timeout=60, check=False)
        assert run.returncode == 2, (args, run.stdout, run.stderr)
        assert says in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1
