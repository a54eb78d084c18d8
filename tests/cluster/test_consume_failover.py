"""The chosen consumption path, proven small (docs/scaling.md, "How workers consume updates"):
a worker's persistent MQTT 3.1.1 session on its shard loses no acknowledged update when the node
leading ``$MQTT_msgs`` is SIGKILLed mid-stream, here with the worker on that very node.
``benchmarks/cluster_consume.py`` runs the same trial at size, beside the rejected options."""

from __future__ import annotations

from benchmarks.cluster_consume import Params, run_trial


def test_a_persistent_session_loses_no_acknowledged_update_when_the_leader_dies() -> None:
    lines: list[str] = []
    # trial 1: worker 0 sits on the node that is killed and resumes its session there.
    result = run_trial("mqtt", 1, Params(messages=600, devices=9, rate=300.0, down_s=1.0),
                       lines.append)
    assert result.worker_on_killed_node
    assert result.killed, lines
    assert result.acked == 600
    assert result.lost == 0, result.lost_ids
    assert result.delivered == 600
