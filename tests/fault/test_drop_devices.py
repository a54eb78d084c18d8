"""Devices vanish mid-round (SIGKILL, SIGTERM, SIGSTOP past the keepalive) and come back.

Rounds close at quorum + grace; a late update joins the round still open or is rejected as
stale. Nothing the broker acknowledged is lost, nothing is counted twice (faultkit.AgentDrill
defines both). ``scripts/faults drop_devices`` is the long run.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fedmq.broker import MosquittoBroker

from faultkit import DropDevicesDrill, broker_config


@pytest.mark.broker
@pytest.mark.slow
def test_devices_vanish_mid_round_and_come_back(mosquitto: MosquittoBroker,
                                                tmp_path: Path) -> None:
    drill = DropDevicesDrill(broker_config(mosquitto), tmp_path, devices=4, rounds=5,
                             weights=[1] * 4, min_updates=2, grace_s=1.0)
    result = drill.run(drops=3, rng=random.Random(5), timeout=60, stall_s=20)
    assert result["drops"] >= 2
    assert result["stalled"] == 0
    assert result["rounds"] == 5
    assert result["round_rule_violations"] == []
    assert result["lost"] == 0, result["lost_updates"]
    assert result["double_counted"] == 0
    assert result["max_abs_diff_vs_reference"] == 0.0
