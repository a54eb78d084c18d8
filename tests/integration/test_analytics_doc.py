"""docs/analytics.md as written: its aggregator.toml and agent.toml run a statistics federation
over Mosquitto (only the port, state_dir, device ids and .npz paths change), and its two ways of
reading the result (ResultSubscriber; mosquitto_sub then msgpack) print what numpy gives on the
devices' values."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from device_agent.service import AgentService
from fedmq.broker import MosquittoBroker
from fedmq.config import load_agent, load_aggregator
from fedmq.statistics import query_of

from fedhelpers import marked_blocks, running_aggregator

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "analytics.md"
F64 = npt.NDArray[np.float64]


def _devices() -> list[dict[str, F64]]:
    rng = np.random.default_rng(3)
    return [
        {"temperature": rng.normal(21, 2, 300), "humidity": rng.uniform(20, 60, 300),
         "CO2": rng.normal(600, 150, 300)},
        {"temperature": rng.normal(23, 1, 50), "CO2": rng.normal(900, 300, 50)},  # no humidity
        {"temperature": rng.normal(19, 3, 120), "humidity": rng.uniform(30, 70, 120),
         "CO2": rng.normal(500, 50, 120), "pressure": rng.normal(1013, 5, 120)},  # not asked
    ]


def test_analytics_page_configs_and_readers(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    blocks = marked_blocks(PAGE, "analytics")
    assert set(blocks) == {"aggregator", "agent", "subscriber", "mosquitto_sub", "plain"}
    port = f"port = {mosquitto.port}"
    (tmp_path / "aggregator.toml").write_text(
        blocks["aggregator"].replace("port = 1883", port)
        .replace('"/var/lib/fedmq/rooms"', f'"{tmp_path / "state"}"'))
    config = load_aggregator(tmp_path / "aggregator.toml")
    values = _devices()
    agents = []
    for i, v in enumerate(values):
        np.savez(tmp_path / f"room-{i}.npz", **v)  # type: ignore[arg-type]
        toml = tmp_path / f"agent-{i}.toml"
        toml.write_text(blocks["agent"].replace("port = 1883", port)
                        .replace('"room-12"', f'"room-{i}"')
                        .replace('"/var/lib/sensors/today.npz"', f'"{tmp_path / f"room-{i}.npz"}"'))
        agents.append(AgentService.from_config(load_agent(toml)))
    try:
        for a in agents:
            a.start()
        with running_aggregator(config) as agg:
            assert agg.wait(60), "the page's federation did not close its one round"
    finally:
        for a in agents:
            a.stop()

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    (tmp_path / "subscriber.py").write_text(
        blocks["subscriber"].replace("port=1883", f"port={mosquitto.port}"))
    sub = subprocess.run([sys.executable, "subscriber.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    lines = {ln.split()[0]: ln.split()[1:] for ln in sub.stdout.splitlines()}
    assert list(lines) == ["temperature", "humidity", "CO2"]
    for name, fields in lines.items():
        x = np.concatenate([v[name] for v in values if name in v])
        count, mean, var, lo, hi = (float(f) for f in fields[:5])
        assert count == x.size
        assert (lo, hi) == (x.min(), x.max())
        assert abs(mean - x.mean()) / abs(x.mean()) < 1e-12
        assert abs(var - x.var()) / x.var() < 1e-12

    mosquitto_sub = shutil.which("mosquitto_sub")
    if mosquitto_sub is None:
        pytest.skip("mosquitto_sub is not installed (scripts/test installs mosquitto-clients)")
    command = blocks["mosquitto_sub"].strip().split(" > ")
    args = [*command[0].split(), "-p", str(mosquitto.port), "-W", "10"]
    with (tmp_path / command[1]).open("wb") as payload:
        subprocess.run(args, stdout=payload, check=True, timeout=30)
    (tmp_path / "plain.py").write_text(blocks["plain"])
    plain = subprocess.run([sys.executable, "plain.py"], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60, check=True)
    printed = plain.stdout.splitlines()
    assert printed[0] == "devices: room-0, room-1, room-2"
    for line, name in zip(printed[1:], ("temperature", "humidity", "CO2"), strict=True):
        x = np.concatenate([v[name] for v in values if name in v])
        assert line.startswith(f"{name}: n={x.size} mean={x.mean():.4g} var={x.var():.4g} "
                               f"min={x.min()} max={x.max()}"), line


def test_configuration_page_statistics_blocks_load(tmp_path: Path) -> None:
    """docs/configuration.md's statistics snippets are valid files as they are (the
    aggregator's announces its three columns with their bins)."""
    blocks = marked_blocks(ROOT / "docs" / "configuration.md", "config-statistics")
    assert set(blocks) == {"aggregator", "agent"}
    (tmp_path / "aggregator.toml").write_text(blocks["aggregator"])
    config = load_aggregator(tmp_path / "aggregator.toml")
    query = {c.name: c.edges for c in query_of(config.task)}
    assert list(query) == ["temperature", "humidity", "CO2"]
    assert (query["CO2"][0], query["CO2"][-1], len(query["CO2"])) == (300.0, 2100.0, 37)
    assert len(query["temperature"]) == 101
    (tmp_path / "agent.toml").write_text(blocks["agent"])
    agent = load_agent(tmp_path / "agent.toml", device_id="room-1")
    assert agent.task.kind == "statistics"
    assert agent.data.source == "npz"
