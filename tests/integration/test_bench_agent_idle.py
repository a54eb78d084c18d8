"""``benchmarks.agent_idle``: one real ``fedmq agent`` process between rounds, on a real
Mosquitto, counted for a few seconds (what ``scripts/bench scale`` reports as
``agent_idle_cpu_s_per_hour``). A count, not a speed: the agent that polled its inbox ten times
a second made about 13 voluntary context switches a second; an idle one now makes almost none.
"""

from __future__ import annotations

import pytest

from benchmarks.agent_idle import measure_agent_idle_cpu


@pytest.mark.broker
def test_an_idle_agent_process_barely_wakes_up() -> None:
    result = measure_agent_idle_cpu(3.0, settle_s=1.0)
    assert {"agent_idle_cpu_s_per_hour", "measured_s", "wakeups_per_s"} <= set(result)
    assert result["measured_s"] >= 3.0
    assert result["agent_idle_cpu_s_per_hour"] >= 0.0
    assert result["wakeups_per_s"] < 3.0, result
