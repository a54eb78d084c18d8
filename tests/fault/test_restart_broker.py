"""SIGKILL Mosquitto mid-round and restart it: nothing lost, nothing counted twice.

Mosquitto persists (``faultkit.PERSISTENCE_OPTIONS``), devices are real agent processes with
on-disk outboxes, the aggregator a process with a persistent session. ``scripts/faults
restart_broker`` is the long run; ``scripts/faults broker_ack_window`` measures the window in
which a kill -9 can still lose a message Mosquitto has acknowledged.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from conftest import require_mosquitto

from faultkit import AckWindowProbe, PersistentMosquitto, RestartBrokerDrill, broker_config


@pytest.mark.broker
@pytest.mark.slow
def test_restart_broker_twice_mid_round(tmp_path: Path) -> None:
    with PersistentMosquitto(tmp_path / "broker", binary=require_mosquitto()) as broker:
        drill = RestartBrokerDrill(broker_config(broker), tmp_path / "drill", devices=4,
                                   rounds=3)
        result = drill.run(broker, kills=2, rng=random.Random(3), timeout=60, stall_s=20)
    assert result["kills"] == 2
    assert result["stalled"] == 0
    assert result["rounds"] == 3
    assert result["round_rule_violations"] == []
    assert result["closed_by"] == {"max_updates": 3}  # every round needs every device
    assert result["sent"] == result["acked"] == result["folded"] == 12
    assert result["lost"] == 0, result["lost_updates"]
    assert result["double_counted"] == 0
    assert result["max_abs_diff_vs_reference"] == 0.0
    assert result["broker_db_bytes"] > 0


@pytest.mark.broker
@pytest.mark.slow
def test_persisting_broker_keeps_acknowledged_messages_over_kill9(tmp_path: Path) -> None:
    """The persistence options work in this Mosquitto: a message queued for an offline durable
    subscriber, or on its way to an online one, survives a SIGKILL 50 ms after its PUBACK (a
    SIGKILL within about a millisecond of the PUBACK loses a queued one: broker_ack_window)."""
    result = AckWindowProbe(tmp_path / "broker", binary=require_mosquitto()).run(2, [50.0])
    assert result["lost_offline_subscriber_kill_50ms_after_puback"] == 0
    assert result["lost_online_subscriber_kill_50ms_after_puback"] == 0
