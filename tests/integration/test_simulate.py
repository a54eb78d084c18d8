"""``fedmq simulate`` against a real Mosquitto and a real aggregator: the simulated devices'
updates are accepted, the summary says so; the asyncio MQTT client speaks 3.1.1 and 5; a fleet
larger than the open-file limit is one clear line; ``scripts/bench scale --help`` works."""

from __future__ import annotations

import dataclasses
import json
import random
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from fedmq.broker import MosquittoBroker
from fedmq.config import CompressionConfig, ModelConfig
from fedmq.simulate_fleet import Delay

from fedhelpers import (
    aggregator_config,
    broker_config,
    running_aggregator,
    unique_federation,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]


def _simulate(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedmq.cli", "simulate", *args],
                          check=False, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


@pytest.mark.parametrize("mqtt5", [False, True], ids=["mqtt3", "mqtt5"])
def test_simulated_fleet_is_accepted_by_the_aggregator(mosquitto: MosquittoBroker, tmp_path: Path,
                                                       mqtt5: bool) -> None:
    fed = unique_federation("sim")
    config = aggregator_config(broker_config(mosquitto), fed, min_updates=50, max_updates=50,
                               max_rounds=2, deadline_s=60.0)
    summary_path = tmp_path / "summary.json"
    with running_aggregator(config) as agg:
        out = _simulate("--devices", "50", "--broker", f"{mosquitto.host}:{mosquitto.port}",
                        "--federation", fed, "--rounds", "2", "--duration", "90",
                        "--delay-ms", "uniform:0:300", "--status", "--progress", "1",
                        "--json", str(summary_path), *(["--mqtt5"] if mqtt5 else []))
        assert out.returncode == 0, out.stdout + out.stderr
        wait_until(lambda: agg.stats.rounds_completed == 2, 10, "two rounds closed")
        assert agg.stats.accepted == 100
        assert not agg.stats.rejected, agg.stats.last_rejection
    assert "connected 50/50" in out.stdout  # the progress line
    summary = json.loads(summary_path.read_text())
    assert summary["protocol"] == ("mqtt5" if mqtt5 else "mqtt3.1.1")
    assert summary["connected_max"] == 50
    assert summary["updates_sent"] == summary["updates_acked"] == 100
    assert summary["rounds"] == 2
    assert summary["errors"] == 0
    assert summary["cpu_s"] > 0
    assert summary["rss_mb"] > 0
    first = summary["rounds_detail"][0]
    assert first["participants"] == first["accepted_from_fleet"] == 50
    assert first["last_ack_to_model_ms"] >= 0


def test_chunked_models_and_updates(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """A 38 KB model in 8 KB chunks: devices take the manifest and its parts, send chunked
    int8 updates, and the aggregator accepts them all."""
    fed = unique_federation("simchunk")
    base = aggregator_config(broker_config(mosquitto), fed, min_updates=10, max_updates=10,
                             max_rounds=2, deadline_s=60.0)
    config = dataclasses.replace(
        base, model=ModelConfig(layers=[64, 128, 10], seed=1),
        compression=CompressionConfig(codec="int8", max_chunk_bytes=4096))
    with running_aggregator(config) as agg:
        out = _simulate("--devices", "10", "--broker", f"{mosquitto.host}:{mosquitto.port}",
                        "--federation", fed, "--rounds", "2", "--duration", "90",
                        "--json", str(tmp_path / "s.json"))
        assert out.returncode == 0, out.stdout + out.stderr
        wait_until(lambda: agg.stats.rounds_completed == 2, 10, "two rounds closed")
        assert agg.stats.accepted == 20
        assert not agg.stats.rejected, agg.stats.last_rejection
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["updates_acked"] == 20
    assert summary["errors"] == 0


def test_dropout_skips_rounds(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """With every device dropping out, updates stay at zero and the round never closes."""
    fed = unique_federation("simdrop")
    config = aggregator_config(broker_config(mosquitto), fed, min_updates=5, max_updates=5,
                               max_rounds=1, deadline_s=60.0)
    with running_aggregator(config) as agg:
        out = _simulate("--devices", "5", "--broker", f"{mosquitto.host}:{mosquitto.port}",
                        "--federation", fed, "--dropout", "1", "--duration", "3",
                        "--json", str(tmp_path / "s.json"))
        assert out.returncode == 0, out.stderr
        assert agg.stats.accepted == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["dropped"] == 5
    assert summary["updates_sent"] == 0
    assert summary["rounds_seen"] == 1
    assert summary["rounds"] == 0


def test_fleet_over_the_file_limit_is_one_line() -> None:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    out = subprocess.run(
        [sys.executable, "-m", "fedmq.cli", "simulate", "--devices", "1000", "--broker",
         "127.0.0.1:1"], check=False, capture_output=True, text=True, timeout=60, cwd=ROOT,
        preexec_fn=low_limit)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "hard limit is 256" in lines[0]


def test_delay_distributions() -> None:
    rng = random.Random(1)
    assert Delay.parse("250").draw_s(rng) == 0.25
    assert all(0.05 <= Delay.parse("uniform:50:80").draw_s(rng) <= 0.08 for _ in range(100))
    assert all(Delay.parse("normal:10:50").draw_s(rng) >= 0 for _ in range(100))
    assert Delay.parse("exp:0").draw_s(rng) == 0
    for bad in ("x", "uniform:1", "gamma:1:2", "-5"):
        with pytest.raises(ValueError, match="bad delay"):
            Delay.parse(bad)


def test_bench_scale_help() -> None:
    out = subprocess.run([sys.executable, "-m", "benchmarks", "scale", "--help"],
                         check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "connections_held_mosquitto" in out.stdout
