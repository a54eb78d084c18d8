"""SIGKILL the aggregator of a secure-aggregation federation mid-run and restart it: every
device's masked update is in exactly one unmasked sum, and the models are the fault-free ones."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fedmq.broker import MosquittoBroker

from faultkit import broker_config
from secagg_drill import SecAggDrill


@pytest.mark.broker
@pytest.mark.slow
def test_kill9_secure_aggregator_three_times(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    drill = SecAggDrill(broker_config(mosquitto), tmp_path, devices=4, rounds=3)
    result = drill.run(kills=3, rng=random.Random(11))
    assert result["kills"] == 3
    assert result["rounds"] == 3
    assert result["sent"] == 12
    assert result["lost"] == 0
    assert result["double_counted"] == 0
    assert result["max_abs_diff_vs_reference"] == 0.0
