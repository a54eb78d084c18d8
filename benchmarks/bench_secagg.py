"""Secure aggregation's costs against plain FedAvg, over a real Mosquitto, in one run.

For each fleet size N (20 and 100 by default) the same federation runs R rounds twice on one
broker: plain FedAvg (fp32 updates) and ``[privacy] secure_aggregation = true``. The devices are
real ``AgentService``s in this process with a trainer that returns a fixed random delta at once,
so a round's time is the protocol's (messages, cryptography, folds), not training. Measured:

* round time: from a round's opening to its model, median over the rounds after the first
  (``secagg_round_slowdown_N`` = secure median / plain median);
* bytes a device sends and receives per round, counted on the broker's side by a subscriber on
  the federation's topics (``secagg_device_bytes_ratio``: bytes a device sends per round,
  secure / plain, at the largest N);
* a device's CPU per round (thread time inside the secure-aggregation steps, or inside encoding
  its plain update);
* the aggregator's unmasking time (rebuilding secrets, regenerating masks, decoding the sum).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

import aggregator.secagg as server_secagg
import device_agent.secagg as device_secagg
import device_agent.service as device_service
from aggregator.service import AggregatorService
from device_agent.service import AgentService
from device_agent.trainers import EvalResult, FitResult, TrainConfig
from fedmq.broker import MosquittoBroker
from fedmq.config import (
    AggregatorConfig,
    BrokerConfig,
    ModelConfig,
    PrivacyConfig,
    RoundsConfig,
)
from fedmq.topics import Topics
from fedmq.transport import PahoTransport

Weights = dict[str, npt.NDArray[np.float32]]
LAYERS = [64, 64, 10]  # the demo's MLP: 4,810 parameters


class FixedDelta:
    """Returns the model plus a fixed small random delta, at once."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self._delta: Weights | None = None

    def fit(self, weights: Weights, config: TrainConfig, round_seed: int) -> FitResult:
        if self._delta is None:
            self._delta = {k: (self.rng.standard_normal(v.shape) * 0.01).astype(np.float32)
                           for k, v in weights.items()}
        return FitResult({k: v + self._delta[k] for k, v in weights.items()}, 50)

    def evaluate(self, weights: Weights) -> EvalResult:
        return EvalResult(loss=0.0, accuracy=None, num_examples=0)


class Meter:
    """Thread CPU time spent inside wrapped functions, and wall time of others."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = defaultdict(float)
        self.wall: dict[str, list[float]] = defaultdict(list)
        self.lock = threading.Lock()

    def cpu_of(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapped(*a: Any, **k: Any) -> Any:
            t = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                with self.lock:
                    self.cpu[key] += time.thread_time() - t
        return wrapped

    def wall_of(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapped(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.wall[key].append(time.perf_counter() - t)
        return wrapped


def _instrument(meter: Meter) -> None:
    """Wrap what a device and the unmasking do (once per process)."""
    for name in ("start", "on_roster", "set_update", "on_delivery", "on_unmask"):
        setattr(device_secagg.DeviceSecAgg, name,
                meter.cpu_of("secure", getattr(device_secagg.DeviceSecAgg, name)))
    # setattr: the modules' own names, which the code calls them by
    setattr(device_service, "encode_update",  # noqa: B010
            meter.cpu_of("plain", getattr(device_service, "encode_update")))  # noqa: B009
    setattr(server_secagg, "unmask_sum",  # noqa: B010
            meter.wall_of("unmask", getattr(server_secagg, "unmask_sum")))  # noqa: B009


class Traffic:
    """Bytes on the federation's topics, by who sent them."""

    def __init__(self, broker: BrokerConfig, federation: str) -> None:
        self.by_kind: dict[str, int] = defaultdict(int)
        self.t = PahoTransport(broker, client_id=f"traffic-{uuid.uuid4().hex[:6]}")
        self.t.subscribe(f"{Topics(federation).base}/#", qos=1)
        self.t.start()
        self.t.wait_connected(10)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.t.inbox.get(timeout=0.1)
            except Exception:  # queue.Empty
                continue
            parts = msg.topic.split("/")
            kind = "/".join(parts[3:5]) if parts[3] == "secagg" else parts[3]
            self.by_kind[kind] += len(msg.payload)

    def stop(self) -> None:
        time.sleep(0.5)
        self._stop.set()
        self._thread.join()
        self.t.stop()


def _run(broker: BrokerConfig, n: int, rounds: int, secure: bool, meter: Meter
         ) -> dict[str, Any]:
    fed = f"bench-{'sa' if secure else 'plain'}-{n}-{uuid.uuid4().hex[:6]}"
    config = AggregatorConfig(
        federation=fed, broker=broker, model=ModelConfig(layers=LAYERS, seed=0),
        rounds=RoundsConfig(min_updates=n, max_updates=n, deadline_s=240.0, grace_s=0.0,
                            max_rounds=rounds),
        privacy=PrivacyConfig(secure_aggregation=secure))
    traffic = Traffic(broker, fed)
    agents = [AgentService.over_mqtt(fed, f"d{i:03d}", FixedDelta(i), broker, evaluate=False)
              for i in range(n)]
    for a in agents:
        a.start()
    meter.cpu.clear()
    meter.wall.clear()
    agg = AggregatorService(config)
    opened: dict[int, float] = {}
    closed: dict[int, float] = {}
    real_open, real_close = agg._open_round, agg._close_round

    def open_round(now: float, snapshot: bool = True) -> None:
        real_open(now, snapshot)
        opened[agg.round] = time.perf_counter()

    def close_round(closed_by: str) -> None:
        closed[agg.round] = time.perf_counter()
        real_close(closed_by)

    agg._open_round = open_round  # type: ignore[method-assign]
    agg._close_round = close_round  # type: ignore[method-assign]
    try:
        agg.start()
        if not agg.wait(60 + 30 * rounds):
            raise SystemExit(f"{'secure' if secure else 'plain'} N={n}: only "
                             f"{agg.stats.rounds_completed}/{rounds} rounds")
    finally:
        agg.stop()
        for a in agents:
            a.stop()
        traffic.stop()
    times = [closed[r] - opened[r] for r in sorted(closed) if r > 1]
    kinds = dict(traffic.by_kind)
    sent_kinds = ("update", "secagg/keys", "secagg/shares", "secagg/masked", "secagg/reveal")
    recv_kinds = ("secagg/roster", "secagg/deliver", "secagg/unmask")
    sent = sum(kinds.get(k, 0) for k in sent_kinds) / (n * rounds)
    # a device reads the roster and the unmask request (each once) and its own delivery
    received = ((kinds.get("secagg/roster", 0) + kinds.get("secagg/unmask", 0))
                + kinds.get("secagg/deliver", 0) / n) / rounds
    cpu = meter.cpu["secure" if secure else "plain"] / (n * rounds)
    out = {"round_s_median": statistics.median(times), "round_s": [round(t, 4) for t in times],
           "device_bytes_sent_per_round": round(sent), "device_cpu_s_per_round": cpu,
           "bytes_by_kind": kinds}
    if secure:
        out["device_secagg_bytes_received_per_round"] = round(received)
        out["unmask_s_median"] = statistics.median(meter.wall["unmask"])
        out["recv_kinds"] = list(recv_kinds)
    return out


def main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench secagg")
    p.add_argument("--devices", type=int, nargs="+", default=[20, 100])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="20 devices, 3 rounds")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(list(argv))
    if args.quick:
        args.devices, args.rounds = [20], 3
    meter = Meter()
    _instrument(meter)
    results: dict[str, Any] = {"layers": LAYERS, "parameters": 64 * 64 + 64 + 64 * 10 + 10,
                               "rounds": args.rounds}
    with MosquittoBroker() as broker:
        cfg = BrokerConfig(host=broker.host, port=broker.port)
        for n in args.devices:
            plain = _run(cfg, n, args.rounds, False, meter)
            secure = _run(cfg, n, args.rounds, True, meter)
            slow = secure["round_s_median"] / plain["round_s_median"]
            results[f"plain_{n}"], results[f"secure_{n}"] = plain, secure
            results[f"secagg_round_slowdown_{n}"] = round(slow, 3)
            results[f"secagg_device_bytes_ratio_{n}"] = round(
                secure["device_bytes_sent_per_round"] / plain["device_bytes_sent_per_round"], 3)
            print(f"N={n}: round {plain['round_s_median']:.3f} s plain, "
                  f"{secure['round_s_median']:.3f} s secure (x{slow:.2f}); a device sends "
                  f"{plain['device_bytes_sent_per_round']} B plain, "
                  f"{secure['device_bytes_sent_per_round']} B secure and reads "
                  f"{secure['device_secagg_bytes_received_per_round']} B of secagg messages; "
                  f"device CPU {plain['device_cpu_s_per_round'] * 1e3:.2f} ms plain, "
                  f"{secure['device_cpu_s_per_round'] * 1e3:.2f} ms secure; unmasking "
                  f"{secure['unmask_s_median'] * 1e3:.1f} ms", flush=True)
    biggest = max(args.devices)
    results["secagg_device_bytes_ratio"] = results[f"secagg_device_bytes_ratio_{biggest}"]
    print(json.dumps({k: v for k, v in results.items() if k.startswith("secagg_")}))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
