"""`fedmq demo --secure-aggregation` over Mosquitto: the same accuracy as the plain demo (the
unmasked sum differs from the plain one by fixed-point rounding only), no update rejected, and
the options it does not work with are one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("extra", [["--mode", "async"], ["--noise-multiplier", "1.0"]])
def test_secure_demo_refuses_what_it_cannot_do(extra: list[str]) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "demo", "--secure-aggregation", *extra],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
        timeout=60, check=False)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0
    assert "--secure-aggregation" in run.stderr
