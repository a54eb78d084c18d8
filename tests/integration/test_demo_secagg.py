"""`fedmq demo --secure-aggregation` over Mosquitto: the same accuracy as the plain demo (the
unmasked sum differs from the plain one by fixed-point rounding only), no update rejected, and
the options it does not work with are one line, exit 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.pld import pld_privacy_accountant

from aggregator.privacy import PLD_GRID

ROOT = Path(__file__).resolve().parents[2]


def _demo(tmp_path: Path, name: str, *extra: str) -> dict[str, object]:
    out = tmp_path / f"{name}.json"
    run = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "demo", "--devices", "10", "--rounds", "5",
         "--broker", "mosquitto", "--json", str(out), *extra],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=240, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 updates rejected" in run.stdout
    data: dict[str, object] = json.loads(out.read_text())
    return data


@pytest.mark.broker
@pytest.mark.slow
def test_secure_demo_matches_the_plain_demo(tmp_path: Path) -> None:
    plain = _demo(tmp_path, "plain")
    secure = _demo(tmp_path, "secure", "--secure-aggregation")
    assert isinstance(plain["final_accuracy"], float)
    assert isinstance(secure["final_accuracy"], float)
    assert abs(secure["final_accuracy"] - plain["final_accuracy"]) <= 0.01


@pytest.mark.broker
def test_secure_demo_with_device_noise_prints_epsilon(tmp_path: Path) -> None:
    """DP with secure aggregation: the devices add the noise, the accountant spends as central
    DP does, every round's line and the JSON carry epsilon."""
    out = tmp_path / "dp.json"
    run = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "demo", "--devices", "6", "--rounds", "3",
         "--broker", "mosquitto", "--secure-aggregation", "--noise-multiplier", "1.0",
         "--clip-norm", "2", "--json", str(out)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=240, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 updates rejected" in run.stdout
    assert "differential privacy: epsilon" in run.stdout
    data = json.loads(out.read_text())
    eps = [r["epsilon"] for r in data["rounds"]]
    assert len(eps) == 3
    assert eps[-1] == data["final_epsilon"]
    for rounds, e in enumerate(eps, start=1):  # every device every round: q = 1, as central
        acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_GRID)
        acc.compose(dp_accounting.GaussianDpEvent(1.0), rounds)
        assert e == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    printed = [float(x) for x in re.findall(r"epsilon (\d+\.\d+) ", run.stdout)]
    assert printed[:3] == [round(e, 3) for e in eps]


def test_secure_demo_refuses_what_it_cannot_do() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "demo", "--secure-aggregation", "--mode", "async"],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=60, check=False)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0
    assert "--secure-aggregation" in run.stderr
