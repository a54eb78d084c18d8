"""``fedmq demo --task statistics``: federated analytics on real sensor readings.

The readings are river's room-occupancy data set (Candanedo and Feldheim, 2016), as the river
wheel ships it: one office room, 509 readings, one every 16 minutes from 4 to 10 February 2015,
of temperature (°C), relative humidity (%), light (lux) and CO2 (ppm). It is read from the
installed package; nothing is downloaded. The data are one room, so a device is one *day* of
the recording (a sensor box that keeps its own day of readings): 7 devices, each holding only
its day's values. docs/analytics.md says why not one device per sensor.

A broker, a statistics aggregator and the day-devices run here, like the training demo; the
demo reads each round's result from the retained result topic, as any app would, and prints
it beside numpy on the pooled readings of the devices the result covers.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmq.config import AggregatorConfig, BrokerConfig, RoundsConfig, TaskConfig
from fedmq.subscriber import ResultSubscriber
from fedmq.wire import ColumnStatistics, StatisticsResult

__all__ = ["COLUMNS", "FEDERATION", "by_day", "occupancy_csv", "reference", "run_statistics"]

F64 = npt.NDArray[np.float64]

FEDERATION = "demo-statistics"

#: Column name -> (its column in river's csv, [lo, hi, nbins] of its histogram). The bins cover
#: what an office sees, in steps a person would read: 0.5 °C, 1 %, 50 lux, 50 ppm.
COLUMNS: dict[str, tuple[str, tuple[float, float, int]]] = {
    "temperature": ("V1", (15.0, 30.0, 30)),
    "humidity": ("V2", (10.0, 50.0, 40)),
    "light": ("V3", (0.0, 1000.0, 20)),
    "CO2": ("V4", (300.0, 2100.0, 36)),
}

_INSTALL = ("fedmq demo --task statistics needs river's room-occupancy readings (river >= 0.26): "
            "pip install 'fedmq[analytics]'")


def occupancy_csv() -> Path | None:
    """Where the installed river keeps occupancy.csv (found without importing river), or None."""
    spec = importlib.util.find_spec("river")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "drift/datasets/occupancy.csv"
    return path if path.is_file() else None


def by_day(path: Path) -> dict[str, dict[str, F64]]:
    """The readings of each day (``YYYY-MM-DD``, in order), per column of ``COLUMNS``."""
    rows: dict[str, list[list[float]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            rows.setdefault(row["time"][:10], []).append(
                [float(row[source]) for source, _ in COLUMNS.values()])
    return {day: {name: np.array([r[i] for r in values], dtype=np.float64)
                  for i, name in enumerate(COLUMNS)} for day, values in sorted(rows.items())}


def reference(values: list[F64], bins: tuple[float, float, int]) -> dict[str, Any]:
    """numpy on the pooled values: what the federation's result must equal."""
    x = np.concatenate(values)
    lo, hi, n = bins
    return {"count": int(x.size), "mean": float(np.mean(x)), "variance": float(np.var(x)),
            "sample_variance": float(np.var(x, ddof=1)), "min": float(x.min()),
            "max": float(x.max()),
            "hist": [int(h) for h in np.histogram(x, np.linspace(lo, hi, n + 1))[0]],
            "underflow": int((x < lo).sum()), "overflow": int((x > hi).sum())}


def _rel(got: float | None, want: float) -> float:
    if got is None:
        return float("inf")
    return abs(got - want) / abs(want) if want else abs(got)


def _column_json(col: ColumnStatistics, ref: dict[str, Any]) -> dict[str, Any]:
    return {"count": col.count, "mean": col.mean, "variance": col.variance,
            "sample_variance": col.sample_variance, "min": col.min, "max": col.max,
            "edges": list(col.edges), "hist": list(col.hist), "underflow": col.underflow,
            "overflow": col.overflow, "devices": col.devices, "numpy": ref,
            "rel_error": {k: _rel(getattr(col, k), ref[k])
                          for k in ("mean", "variance", "sample_variance")},
            "exact_match": {k: getattr(col, k) == ref[k] for k in ("count", "min", "max")}
            | {"hist": list(col.hist) == ref["hist"] and col.underflow == ref["underflow"]
               and col.overflow == ref["overflow"]}}


_BARS = "▁▂▃▄▅▆▇█"


def _histogram_line(col: ColumnStatistics) -> str:
    """The histogram in one line: its non-empty span as bars, its fullest bin, the outliers."""
    hist = np.array(col.hist)
    nonzero = np.flatnonzero(hist)
    if not nonzero.size:
        return f"no readings inside [{col.edges[0]:g}, {col.edges[-1]:g}]"
    a, b = int(nonzero[0]), int(nonzero[-1])
    top = int(np.argmax(hist))
    bars = "".join(" " if h == 0 else _BARS[min(7, int(8 * h / (hist.max() + 1)))]
                   for h in hist[a:b + 1])
    return (f"[{col.edges[a]:g}, {col.edges[b + 1]:g}) {bars}  fullest "
            f"[{col.edges[top]:g}, {col.edges[top + 1]:g}): {hist[top]}; "
            f"below {col.underflow}, above {col.overflow}")


def _print_result(result: StatisticsResult, data: Mapping[str, Mapping[str, F64]],
                  out: dict[str, Any]) -> None:
    covered = [data[d.removeprefix("day-")] for d in result.devices]
    print(f"{'column':<12} {'':<6} {'count':>6} {'mean':>20} {'variance':>22} {'min':>8} "
          f"{'max':>8} {'devices':>7}")
    for col in result.columns:
        ref = reference([v[col.name] for v in covered], COLUMNS[col.name][1])
        entry = _column_json(col, ref)
        out[col.name] = entry
        print(f"{col.name:<12} {'fedmq':<6} {col.count:>6} {col.mean!r:>20} "
              f"{col.variance!r:>22} {col.min!r:>8} {col.max!r:>8} {col.devices:>7}")
        print(f"{'':<12} {'numpy':<6} {ref['count']:>6} {ref['mean']!r:>20} "
              f"{ref['variance']!r:>22} {ref['min']!r:>8} {ref['max']!r:>8}")
        err = entry["rel_error"]
        exact = "equal" if all(entry["exact_match"].values()) else "DIFFERENT"
        print(f"{'':<12} rel. error: mean {err['mean']:.1e}, variance {err['variance']:.1e}, "
              f"sample variance {err['sample_variance']:.1e}; count, min, max and histogram "
              f"vs numpy: {exact}")
        print(f"{'':<12} histogram {_histogram_line(col)}")


def run_statistics(args: argparse.Namespace) -> int:
    """The demo with ``--task statistics``; returns the process exit code."""
    path = occupancy_csv()
    if path is None:
        print(_INSTALL, file=sys.stderr)
        return 2
    try:  # the aggregator needs numba (the analytics extra has it)
        for module in ("aggregator.service", "device_agent.service"):
            importlib.import_module(module)
    except ImportError as exc:
        print(f"fedmq demo needs the analytics extra ({exc.name} is missing): "
              "pip install 'fedmq[analytics]'", file=sys.stderr)
        return 2
    data = by_day(path)
    days = list(data)[:args.devices] if args.devices is not None else list(data)
    rounds = args.rounds if args.rounds is not None else 1
    if not days or rounds < 1:
        print("fedmq demo: --devices and --rounds must be at least 1", file=sys.stderr)
        return 2
    started = time.monotonic()
    out: dict[str, Any] = {"task": "statistics", "dataset": str(path), "rounds": [],
                           "devices": [{"id": f"day-{d}", "readings": len(data[d]["CO2"])}
                                       for d in days]}
    with contextlib.ExitStack() as stack:
        from fedmq.demo import open_broker

        opened = open_broker(stack, args.broker)
        if opened is None:
            return 1
        handle, broker = opened
        out["broker"] = handle.kind
        print(f"river's room-occupancy readings ({path.name}, from the installed package): "
              f"{sum(d['readings'] for d in out['devices'])} readings of one room, one every "
              f"16 min; one device per day of the recording: {len(days)} devices "
              f"({days[0]} .. {days[-1]})")
        last, rejected = _federate(stack, broker, {d: data[d] for d in days}, rounds, args, out)
    if last is None:
        print(f"fedmq demo: timed out after {args.timeout:.0f} s with {len(out['rounds'])}/"
              f"{rounds} rounds done", file=sys.stderr)
        return 1
    out["result_devices"] = list(last.devices)
    out["columns"] = {}
    print(f"result of round {rounds}, read from the retained topic fedmq/v1/{FEDERATION}/result, "
          "beside numpy on the pooled readings of the devices it covers:")
    _print_result(last, data, out["columns"])
    out["rejected"] = rejected
    out["wall_s"] = round(time.monotonic() - started, 2)
    worst = {k: max(c["rel_error"][k] for c in out["columns"].values())
             for k in ("mean", "variance")}
    out["max_rel_error"] = worst
    print(f"max relative error vs numpy: mean {worst['mean']:.1e}, variance "
          f"{worst['variance']:.1e} ({out['broker']} broker, {out['wall_s']:.1f} s, "
          f"{rejected} contributions rejected)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


def _federate(stack: contextlib.ExitStack, broker: BrokerConfig,  # noqa: PLR0917
              data: Mapping[str, Mapping[str, F64]], rounds: int, args: argparse.Namespace,
              out: dict[str, Any]) -> tuple[StatisticsResult | None, int]:
    """Run the aggregator and one device per day until ``rounds`` results are in; the last
    result (None on timeout) and how many contributions were rejected."""
    from aggregator.service import AggregatorService
    from device_agent.service import AgentService
    from device_agent.statistics import Analyst, NoTraining

    config = AggregatorConfig(
        federation=FEDERATION, broker=broker,
        # Every day-device every round: a round closes the moment all are in.
        rounds=RoundsConfig(min_updates=len(data), max_updates=len(data), deadline_s=60.0,
                            grace_s=1.0, max_rounds=rounds),
        task=TaskConfig(kind="statistics", columns=list(COLUMNS),
                        column_bins={k: list(b) for k, (_, b) in COLUMNS.items()}))
    agg = AggregatorService(config)
    results: dict[int, StatisticsResult] = {}

    def keep(result: StatisticsResult) -> None:
        if result.run == agg.run:  # not a retained result of an earlier run
            results.setdefault(result.round, result)

    # Subscribed before anything is published, like any app on the result topic.
    reader = ResultSubscriber(broker, FEDERATION, on_result=keep).start()
    stack.callback(reader.stop)
    for day, values in data.items():
        agent = AgentService.over_mqtt(FEDERATION, f"day-{day}", NoTraining(), broker,
                                       evaluate=False)
        agent.analyst = Analyst(_values_of(values))  # what [task] statistics would return
        agent.start()
        stack.callback(agent.stop)
    agg.start()
    stack.callback(agg.stop)
    deadline = time.monotonic() + args.timeout
    round_started = time.monotonic()
    for r in range(1, rounds + 1):
        while r not in results:
            if time.monotonic() > deadline:
                return None, sum(agg.stats.rejected.values())
            reader.poll(0.2)
        res = results[r]
        seconds = time.monotonic() - round_started
        round_started = time.monotonic()
        out["rounds"].append({"round": r, "devices": list(res.devices),
                              "closed_by": res.closed_by, "seconds": round(seconds, 3)})
        print(f"round {r}/{rounds}: result from {len(res.devices)} devices "
              f"({res.devices[0]} .. {res.devices[-1]}), closed by {res.closed_by} "
              f"({seconds:.2f} s)", flush=True)
    return results[rounds], sum(agg.stats.rejected.values())


def _values_of(day: Mapping[str, F64]) -> Callable[[], Mapping[str, F64]]:
    return lambda: day
