"""Federated analytics over a real Mosquitto: real agents (the built-in .npz source and a
user's function) send summaries, one drops out, and each round's retained result equals numpy
on the union of the values of exactly the devices it lists."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from device_agent.service import AgentService
from fedmq.broker import MosquittoBroker
from fedmq.config import (
    AgentConfig,
    AggregatorConfig,
    DataConfig,
    DeviceConfig,
    DeviceTaskConfig,
    ModelConfig,
    RoundsConfig,
    TaskConfig,
)
from fedmq.subscriber import ResultSubscriber
from fedmq.wire import ColumnStatistics, ModelUpdate, StatisticsResult

from fedhelpers import Recorder, broker_config, running_aggregator
from fedhelpers import unique_federation as new_federation

pytestmark = [pytest.mark.broker, pytest.mark.slow]

F64 = npt.NDArray[np.float64]
COLUMNS = {"temp": [10.0, 35.0, 25], "pressure": [1e9 - 4.0, 1e9 + 4.0, 16]}


def _device_values(rng: np.random.Generator) -> list[dict[str, F64]]:
    """Hostile on purpose: readings 1e9 + small noise, a device with one value, a device with
    no pressure at all, values outside the bins, a missing (NaN) reading."""
    def big(n: int) -> F64:
        return 1e9 + rng.normal(0.0, 1.5, n)

    return [
        {"temp": rng.normal(21.0, 2.0, 500), "pressure": big(400)},
        {"temp": np.array([19.25]), "pressure": np.array([1e9 + 0.125])},
        {"temp": np.concatenate([rng.normal(24.0, 6.0, 300), [np.nan, 50.0, -3.0]])},
        {"temp": rng.normal(18.0, 1.0, 1000), "pressure": big(2000)},
        {"temp": rng.normal(30.0, 3.0, 50), "pressure": big(7)},
    ]


def _expected(name: str, values: list[F64]) -> dict[str, object]:
    x = np.concatenate([v for v in values if v.size] or [np.zeros(0)])
    x = x[np.isfinite(x)]
    lo, hi, n = COLUMNS[name]
    edges = np.linspace(lo, hi, int(n) + 1)
    return {"count": x.size, "mean": np.mean(x), "variance": np.var(x),
            "sample_variance": np.var(x, ddof=1), "min": x.min(), "max": x.max(),
            "hist": tuple(int(h) for h in np.histogram(x, edges)[0]),
            "underflow": int((x < lo).sum()), "overflow": int((x > hi).sum())}


def _check(col: ColumnStatistics, want: dict[str, object]) -> dict[str, float]:
    assert col.count == want["count"]
    assert (col.min, col.max) == (want["min"], want["max"])  # exact
    assert (col.hist, col.underflow, col.overflow) == (
        want["hist"], want["underflow"], want["overflow"])
    errors = {}
    for key in ("mean", "variance", "sample_variance"):
        got, ref = getattr(col, key), float(want[key])  # type: ignore[arg-type]
        errors[key] = abs(got - ref) / abs(ref)
        assert errors[key] < 1e-12, (col.name, key, got, ref)
    return errors


def _agent_config(fed: str, broker: MosquittoBroker, device: str, tmp: Path,
                  values: dict[str, F64], *, function: str | None = None,
                  shared: list[str] | None = None) -> AgentConfig:
    path = tmp / f"{device}.npz"
    np.savez(path, **values)  # type: ignore[arg-type]
    return AgentConfig(
        federation=fed, broker=broker_config(broker), device=DeviceConfig(id=device),
        data=DataConfig(source="npz", path=str(path)),
        task=DeviceTaskConfig(kind="statistics", columns=shared or [], statistics=function))


def test_results_cover_exactly_the_reporting_devices(
        mosquitto: MosquittoBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fed = new_federation("stats")
    broker = broker_config(mosquitto)
    values = _device_values(np.random.default_rng(7))
    # dev-4 computes its values with a user's function (which reads its own file).
    module = tmp_path / "sensor_readings.py"
    module.write_text(textwrap.dedent(f"""
        import numpy as np

        def read(config):
            with np.load({str(tmp_path / 'dev-4.npz')!r}) as f:
                return {{name: f[name] for name in f.files}}
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    configs = [_agent_config(fed, mosquitto, f"dev-{i}", tmp_path, v,
                             function="sensor_readings:read" if i == 4 else None)
               for i, v in enumerate(values)]
    config = AggregatorConfig(
        federation=fed, broker=broker, model=ModelConfig(layers=[4, 2], seed=0),
        rounds=RoundsConfig(min_updates=3, max_updates=5, deadline_s=6.0, grace_s=0.5,
                            max_rounds=2),
        task=TaskConfig(kind="statistics", columns=list(COLUMNS),
                        column_bins={k: list(v) for k, v in COLUMNS.items()}))
    recorder = Recorder(broker, fed).start()
    agents = [AgentService.from_config(c) for c in configs]
    # dev-2 drops out in the second round: asked for its values, it disconnects instead.
    dev2 = agents[2]
    assert dev2.analyst is not None
    first_read = dev2.analyst.values
    calls = 0

    def drop_out() -> Mapping[str, npt.ArrayLike]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return first_read()
        dev2.transport.stop()
        raise ConnectionError("dev-2 went away")

    dev2.analyst.values = drop_out
    reader = ResultSubscriber(broker, fed)
    try:
        for agent in agents:
            agent.start()
        reader.start()
        with running_aggregator(config) as agg:
            assert agg.wait(60), "the federation did not finish its two rounds"
        recorder.wait_for(lambda r: len(r.of(StatisticsResult)) >= 2)
        latest = reader.wait_for_round(2, timeout=10)
    finally:
        for agent in agents:
            agent.stop()
        reader.stop()
        recorder.stop()
    sys.modules.pop("sensor_readings", None)

    first, second = recorder.of(StatisticsResult)[:2]
    assert first.devices == ("dev-0", "dev-1", "dev-2", "dev-3", "dev-4")
    assert second.devices == ("dev-0", "dev-1", "dev-3", "dev-4")
    assert second.closed_by in ("grace", "deadline")  # five never came
    assert calls == 2
    assert dev2.training_errors == 1
    # One contribution per device and round: nothing lost, nothing counted twice.
    senders = sorted(u.device_id for u in recorder.of(ModelUpdate))
    assert senders.count("dev-2") == 1
    assert all(senders.count(f"dev-{i}") == 2 for i in (0, 1, 3, 4))
    check_results((first, second), values)
    assert latest == second  # the app's view: the retained latest result


def check_results(results: tuple[StatisticsResult, ...], values: list[dict[str, F64]]) -> None:
    """Each result equals numpy on the union of the values of exactly the devices it lists."""
    errors: list[dict[str, float]] = []
    for result in results:
        covered = [values[int(d.removeprefix("dev-"))] for d in result.devices]
        by_name = {c.name: c for c in result.columns}
        assert list(by_name) == list(COLUMNS)
        for name in COLUMNS:
            errors.append(_check(by_name[name], _expected(
                name, [v.get(name, np.zeros(0)) for v in covered])))
        # dev-2 has no pressure: it is a device of the result, not of that column's values.
        assert by_name["pressure"].devices == len(result.devices) - ("dev-2" in result.devices)
    print("max relative errors:", {k: max(e[k] for e in errors) for k in errors[0]})
