"""A short run of the ``poison`` drill (tests/fault/poison.py) over a real Mosquitto.

6 devices of which 2 attackers answer every round with +3e38 in every coordinate at the maximum
weight, 3 rounds: every round closes, the aggregator's worker never fails and every published
model is finite. ``scripts/faults poison`` is the full drill (20 devices, 20 rounds, accuracy).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from fedmq.broker import MosquittoBroker
from fedmq.config import BrokerConfig

# tests/fault is not a package: import its poison.py as the drill scripts do (by path).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fault"))
poison = importlib.import_module("poison")


@pytest.mark.broker
def test_huge_updates_from_two_attackers_leave_the_rounds_and_the_model_intact(
        mosquitto: MosquittoBroker) -> None:
    broker = BrokerConfig(host=mosquitto.host, port=mosquitto.port, reconnect_min_s=0.1,
                          reconnect_max_s=1.0)
    lines: list[str] = []
    result = poison.run_poison(seed=0, rounds=3, devices=6, scenarios=("huge",), clean=False,
                               broker=broker, timeout_s=25.0, progress=lines.append)
    huge = result["scenarios"]["huge"]
    assert huge["attack_updates_sent"] >= poison.ATTACKERS * 3  # the attack did happen
    assert huge["rounds_closed"] == 3, huge
    assert huge["worker_errors"] == 0, huge.get("worker_error_samples")
    assert huge["model_finite"], huge
    assert len(huge["accuracies"]) == 3
    assert len(lines) == 3 + 1  # one line per round, one when the run is done
