"""SIGKILL the aggregator mid-run and restart it: nothing lost, nothing counted twice."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fedmq.broker import MosquittoBroker

from faultkit import Drill, broker_config


@pytest.mark.broker
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_kill9_aggregator_three_times(mosquitto: MosquittoBroker, tmp_path: Path,
                                      strategy: str) -> None:
    # fedadam: its moments are in every snapshot and rebuilt by the replay, to the bit.
    drill = Drill(broker_config(mosquitto), tmp_path, devices=4, rounds=3, strategy=strategy)
    result = drill.run(kills=3, rng=random.Random(7))
    assert result["kills"] == 3
    assert result["rounds"] == 3
    assert result["sent"] == 12
    assert result["lost"] == 0
    assert result["double_counted"] == 0
    assert result["max_abs_diff_vs_reference"] == 0.0
