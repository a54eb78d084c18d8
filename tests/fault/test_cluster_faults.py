"""Scale-out fault drills, the suite's short versions (issue 13, acceptance 2; the long ones:
``scripts/faults cluster_node|cluster_worker|cluster_coordinator``): on a real 3-node NATS
JetStream cluster, a coordinator and two workers as processes, 6 driven devices over the three
nodes, 6 rounds, the fault 5 times mid-round. Nothing acknowledged is lost, nothing counted
twice, every round closes, and the final model is the reference's bits and the fault-free run's.

The engine's ``ack_wait`` is 3 s here (the shipped template keeps nats-server's 30 s): a message
delivered to a session whose client was killed before it acknowledged is redelivered only after
that, so with 30 s a kill can hold a round half a minute (``scripts/faults`` runs the shipped
value).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cluster_drill import cluster_passed, run_cluster_drill

KILLS = 5


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cluster_node", "cluster_worker", "cluster_coordinator"])
def test_cluster_fault_drill(kind: str, tmp_path: Path) -> None:
    result = run_cluster_drill(kind, tmp_path, kills=KILLS, rounds=6, devices=6, seed=3,
                               ack_wait="3s")
    summary = {k: v for k, v in result.items() if k != "contributor_orders"}
    why = json.dumps(summary, indent=1, default=str)
    assert result["kills"] == KILLS, why
    assert result["rounds_closed"] == 6, why
    assert result["lost"] == 0, why
    assert result["double_counted"] == 0, why
    assert result["max_abs_diff_vs_reference"] == 0.0, why
    assert result["bit_identical_to_fault_free"] is True, why
    assert cluster_passed(result), why
