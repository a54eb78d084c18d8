"""The scale bench's cluster scenarios in a tiny size (benchmarks/bench_scale_cluster.py): a real
3-node NATS cluster, a coordinator and two workers as processes, ``fedmq simulate`` fleets.

Checks that the bench's machinery produces its figures (every device counted, the burst drill
releases every stored update to the workers), never how fast: no timed assertions.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench_scale_cluster import (
    ClusterScenario,
    _latency,
    _participants,
    run_burst,
    run_cluster_scenario,
)


def test_held_scenario_counts_every_device_over_three_nodes(tmp_path: Path) -> None:
    s = ClusterScenario("tinyheld", 30, 30, 1.0, 1, "uniform:0:500", deadline_s=120)
    run = run_cluster_scenario(s, tmp_path, quiet=True)
    assert [sim["connected_max"] for sim in run["sims"]] == [10, 10, 10]
    assert _participants(run) == [30]
    assert set(run["worker_rss_peak_mb"]) == {"w0", "w1"}


def test_latency_scenario_has_a_figure_per_round(tmp_path: Path) -> None:
    s = ClusterScenario("tinylat", 10, 10, 1.0, 2, "uniform:0:300", processes=1, deadline_s=120)
    run = run_cluster_scenario(s, tmp_path, quiet=True)
    assert _participants(run) == [10, 10]
    assert _latency(run) is not None


def test_burst_releases_every_stored_update_to_the_workers(tmp_path: Path) -> None:
    b = run_burst(30, 2, tmp_path)
    assert b["accepted"] == 30
    assert sum(w["accepted"] for w in b["per_worker"].values()) == 30
    assert b["rounds_with_model"] == [1, 1, 1]
