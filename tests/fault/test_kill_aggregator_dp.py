"""SIGKILL the aggregator with differential privacy on: nothing lost or counted twice, the
noisy model equal to the reference that re-derives the noise, and every round's epsilon the
accountant's for that many rounds, across restarts."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fedmq.broker import MosquittoBroker

from dp_drill import DpDrill, expected_epsilon
from faultkit import broker_config


@pytest.mark.broker
@pytest.mark.slow
def test_kill9_aggregator_with_dp(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    drill = DpDrill(broker_config(mosquitto), tmp_path, devices=4, rounds=3,
                    noise_multiplier=1.0)
    result = drill.run(kills=3, rng=random.Random(5))
    assert result["kills"] == 3
    assert result["rounds"] == 3
    assert result["sent"] == 12
    assert result["lost"] == 0
    assert result["double_counted"] == 0
    assert result["max_abs_diff_vs_reference"] == 0.0
    assert result["epsilon_mismatches"] == 0
    assert result["final_epsilon"] == pytest.approx(expected_epsilon(1.0, 3), rel=1e-9)
