"""SIGKILL the aggregator in async mode (FedBuff buffers with stale updates): nothing lost,
nothing counted twice, and the same bits as the run without kills."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fedmq.broker import MosquittoBroker

from async_drill import AsyncDrill
from faultkit import broker_config


@pytest.mark.broker
@pytest.mark.slow
def test_kill9_aggregator_in_async_mode(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    broker = broker_config(mosquitto)
    clean = AsyncDrill(broker, tmp_path / "clean", devices=3, rounds=4)
    clean_result = clean.run(kills=0, rng=random.Random(0))
    assert clean_result["lost"] == 0
    drill = AsyncDrill(broker, tmp_path / "killed", devices=3, rounds=4, fault_free=clean.final)
    result = drill.run(kills=3, rng=random.Random(11))
    assert result["kills"] == 3
    assert result["rounds"] == 4
    assert result["sent"] == 16  # 4 buffers of 3 fresh updates and a stale one
    assert result["staleness_max"] == 2.0
    assert result["lost"] == 0
    assert result["double_counted"] == 0
    assert result["bit_identical_to_fault_free"] is True
    assert result["max_abs_diff_vs_reference"] <= 1e-9
