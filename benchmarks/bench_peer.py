"""The ``peer`` benchmark: our streaming FedAvg fold against the way Flower aggregates.

Both sides start from the same replies, made before anything is measured: each reply's tensors as
their own float32 arrays (what Flower's ``parameters_to_ndarrays`` hands to ``aggregate()``) and
its ``num_examples``. Each side's measured region is the aggregation alone:

peer (Flower's ``flwr.server.strategy.aggregate.aggregate``, reproduced)
    The list of all replies; a scaled copy of every array (``layer * num_examples``), then a reduce
    over the clients layer by layer (``reduce(np.add, ...) / num_examples_total``). Flower computes
    in float32, as here (the weights are Python ints, so numpy keeps float32).
ours (``aggregator.strategies.FedAvg``)
    ``FedAvg(spec)`` (the float64 accumulator is allocated inside the measured region),
    ``init(base)`` with a zero base so the result is the weighted mean, then each reply's arrays
    folded (zero-copy) one reply at a time, then ``finalize()``.
numpy_stream (the issue's calibration)
    A plain numpy streaming fold, ``acc += n * x`` per reply into float64 accumulators. The issue
    reports it about 7x faster than Flower's ``aggregate()`` on its machine; the ratio printed
    here shows how this machine compares.

Peak Python allocations come from tracemalloc (numpy reports its buffers to it), one side at a
time, in a pass of their own; wall time from ``time.perf_counter`` in passes without
tracemalloc, the sides alternating, medians compared. All results must agree (``np.allclose``,
rtol 1e-5) or the benchmark fails. If ``flwr`` is importable its own ``aggregate()`` is measured
the same way.

The peer's time depends on where its 200 x params of new arrays come from, so it is measured
in four heap states and all are reported:

- new process (the headline ``time_ratio_peer_over_ours``, also ``*_cold``): every run alone in
  a fresh interpreter, as a script timing one call measures; every page a side allocates is
  faulted in. This is the state of the issue's reference figures: "about 7x faster ... with 25x
  less resident memory" can only be measured where the aggregation's arrays grow the resident
  set, and each side's resident growth is measured and printed here to compare with it (see
  docs/benchmarks.md for the decision).
- warm (``*_warm``): repeated runs in this process. The heap keeps the pages the previous run
  freed, as in a long-running server, so they cost no page faults.
- heap trimmed (glibc): ``malloc_trim(0)`` before every run of either side (``*_trimmed``).
- round loop: peer and ours each in a fresh interpreter for several rounds, the replies
  deserialised anew each round as a server receives them; the first round and the median of the
  later ones (``time_ratio_round_loop_first/later_peer_over_ours``).

From the repo root::

    python -m benchmarks.bench_peer [--quick] [--json PATH] [--no-cold]
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import importlib
import json
import math
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from aggregator.kernels import set_fold_threads, warmup
from aggregator.spec import ModelSpec
from aggregator.strategies import FedAvg
from fedmq.config import StrategyConfig
from fedmq.wire import Tensor

F32 = npt.NDArray[np.float32]
NDArrays = list[npt.NDArray[Any]]
#: One reply as it arrives: each tensor's encoded fp32 bytes, in the model's order.
Payload = tuple[bytes, ...]
Aggregate = Callable[[list[tuple[NDArrays, int]]], NDArrays]

FULL_UPDATES, FULL_PARAMS = 200, 1_000_000
QUICK_UPDATES, QUICK_PARAMS = 40, 250_000
FULL_REPEAT, QUICK_REPEAT = 5, 7
RTOL = 1e-5
# Values are about 0.05; entries near zero need an absolute floor (float32 sums of 200 terms).
ATOL = 1e-6
TARGET_MEM, TARGET_TIME = 20.0, 8.0


@dataclass(frozen=True)
class Inputs:
    """The model layout and every reply, encoded, with its weight."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    payloads: list[Payload]
    num_examples: list[int]

    @property
    def params(self) -> int:
        """Parameters per update."""
        return sum(math.prod(s) for s in self.shapes)


def layer_shapes(params: int) -> list[tuple[str, tuple[int, ...]]]:
    """A two-layer MLP's four tensors holding exactly ``params`` values (about 3/4 in fc1)."""
    h = max(1, math.isqrt(params))
    fc1 = (h, max(1, params * 3 // 4 // h))
    rows2 = max(0, (params - math.prod(fc1) - 2 * h) // h)
    b2 = params - math.prod(fc1) - h - rows2 * h
    if b2 <= 0:
        raise ValueError(f"{params} parameters are too few for four tensors")
    return [("fc1.weight", fc1), ("fc1.bias", (h,)), ("fc2.weight", (rows2, h)),
            ("fc2.bias", (b2,))]


def make_inputs(updates: int, params: int, seed: int) -> Inputs:
    """``updates`` replies of a model near a common one (as clients' trained weights are)."""
    rng = np.random.default_rng(seed)
    layout = layer_shapes(params)
    model = [rng.standard_normal(s, dtype=np.float32) * np.float32(0.05) for _, s in layout]
    payloads: list[Payload] = []
    for _ in range(updates):
        payloads.append(tuple(
            (m + np.float32(0.01) * rng.standard_normal(m.shape, dtype=np.float32))
            .astype("<f4").tobytes()
            for m in model
        ))
    return Inputs(
        names=tuple(n for n, _ in layout),
        shapes=tuple(s for _, s in layout),
        payloads=payloads,
        # Python ints, as Flower's FitRes.num_examples
        num_examples=[int(n) for n in rng.integers(10, 1000, size=updates)],
    )


# ---------------------------------------------------------------- the two sides


def flower_style_aggregate(results: list[tuple[NDArrays, int]]) -> NDArrays:
    """Flower's ``aggregate()``: scaled copies of every client's arrays, then a reduce per layer."""
    num_examples_total = sum(num_examples for _, num_examples in results)
    weighted_weights = [
        [layer * num_examples for layer in weights] for weights, num_examples in results
    ]
    return [
        functools.reduce(np.add, layer_updates) / num_examples_total
        for layer_updates in zip(*weighted_weights, strict=True)
    ]


def deserialize(inputs: Inputs) -> list[tuple[NDArrays, int]]:
    """Every reply as its own float32 arrays (new buffers, as Flower's ``bytes_to_ndarray``)."""
    return [
        ([np.frombuffer(b, dtype="<f4").reshape(s).copy()
          for b, s in zip(blobs, inputs.shapes, strict=True)], n)
        for blobs, n in zip(inputs.payloads, inputs.num_examples, strict=True)
    ]


def run_peer(results: list[tuple[NDArrays, int]],
             aggregate: Aggregate = flower_style_aggregate) -> NDArrays:
    """Peer side: the list of every reply's arrays aggregated at once."""
    return aggregate(results)


def run_ours(results: list[tuple[NDArrays, int]], names: Sequence[str], spec: ModelSpec,
             base: dict[str, F32]) -> NDArrays:
    """Our side: fold each reply's arrays (zero-copy) as it comes, then finalize."""
    strategy = FedAvg(spec)
    strategy.init(base)
    for arrays, n in results:
        # The kernels read any C-contiguous buffer; a float32 array is one (Tensor.data is
        # typed as the wire's bytes).
        tensors = [
            Tensor(name=name, dtype="float32", shape=a.shape, codec="fp32", data=cast(bytes, a))
            for name, a in zip(names, arrays, strict=True)
        ]
        strategy.fold(tensors, n)
    model = strategy.finalize()
    return [model[name] for name in names]


def run_numpy_stream(results: list[tuple[NDArrays, int]]) -> NDArrays:
    """The issue's calibration: a plain numpy streaming fold, ``acc += n * x`` per reply."""
    total = sum(n for _, n in results)
    accs = [np.zeros(a.shape) for a in results[0][0]]
    for arrays, n in results:
        for i, a in enumerate(arrays):
            accs[i] += n * a
    return [(acc / total).astype(np.float32) for acc in accs]


# ---------------------------------------------------------------- measuring


def peak_bytes(fn: Callable[[], NDArrays]) -> tuple[int, NDArrays]:
    """Peak traced allocations while ``fn`` runs (its result included), and the result."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        out = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, out


def seconds(fn: Callable[[], NDArrays], before: Callable[[], object] | None = None,
            ) -> tuple[float, int]:
    """Wall time of one call (tracemalloc off) and the minor page faults it took.

    ``before`` runs first, outside the timing; the result is dropped outside the timing.
    """
    gc.collect()
    if before is not None:
        before()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - t0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    del out
    return elapsed, faults


def load_malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)`` (give freed heap memory back to the OS), or None elsewhere."""
    try:
        fn = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return lambda: fn(0)


def timed_pass(sides: dict[str, Callable[[], NDArrays]], repeat: int,
               before: Callable[[], object] | None = None,
               ) -> dict[str, list[tuple[float, int]]]:
    """``repeat`` timed runs of every side, the order rotated each time."""
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in sides}
    order = list(sides)
    for r in range(repeat):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            runs[name].append(seconds(sides[name], before))
    return runs


def medians(runs: dict[str, list[tuple[float, int]]]) -> dict[str, tuple[float, int]]:
    """Median seconds and median page faults per side."""
    return {
        name: (statistics.median(t for t, _ in rs), int(statistics.median(f for _, f in rs)))
        for name, rs in runs.items()
    }


def check_agree(label: str, ref: NDArrays, got: NDArrays, names: Sequence[str]) -> float:
    """Max absolute difference; raises ``AssertionError`` when any tensor is not allclose."""
    worst = 0.0
    for name, a, b in zip(names, ref, got, strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise AssertionError(
                f"{label}: tensor {name!r} is {b.dtype} {b.shape}; expected {a.dtype} {a.shape}"
            )
        if not np.allclose(a, b, rtol=RTOL, atol=ATOL):
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            raise AssertionError(
                f"{label}: tensor {name!r} differs (max abs diff {float(diff.max()):.3g})"
            )
        worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    return worst


def load_flwr() -> Aggregate | None:
    """Flower's own ``aggregate()``, or None when flwr is not installed."""
    try:
        mod = importlib.import_module("flwr.server.strategy.aggregate")
    except ImportError:
        return None
    return cast(Aggregate, mod.aggregate)


def fmt_bytes(n: float) -> str:
    """Bytes in MiB, for the table."""
    return f"{n / 2**20:.1f} MiB"


Sides = dict[str, Callable[[], NDArrays]]
Medians = dict[str, tuple[float, int]]


@dataclass
class Measured:
    """Everything one run of the benchmark measured, by side."""

    peaks: dict[str, int]
    #: Max |difference| from the peer side's result (which is their reference).
    diffs: dict[str, float]
    #: Max |error| against the weighted mean computed in float64.
    errors: dict[str, float]
    runs: dict[str, list[tuple[float, int]]]
    med: Medians
    med_trim: Medians | None
    #: Each run in a fresh process (``cold_pass``); None when not measured.
    med_cold: Medians | None = None
    #: Median growth of the resident set (peak during the run) in a fresh process, by side;
    #: empty where the kernel cannot reset its peak mark.
    rss_cold: dict[str, int] = field(default_factory=dict)


def status_bytes(key: str) -> int | None:
    """A size field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in bytes; None elsewhere."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak resident mark (``VmHWM``), Linux ``clear_refs`` 5."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def resident_growth(fn: Callable[[], NDArrays]) -> tuple[float, int, int | None]:
    """Seconds and page faults of one call (``seconds``) and how far its peak resident set rose
    above the resident set before it (result included); None where that cannot be read."""
    gc.collect()
    rss0 = status_bytes("VmRSS")
    armed = rss0 is not None and reset_peak_rss()
    elapsed, faults = seconds(fn)
    hwm = status_bytes("VmHWM")
    growth = hwm - rss0 if armed and hwm is not None and rss0 is not None else None
    return elapsed, faults, growth


def cold_pass(names: Sequence[str], repeat: int, argv: Sequence[str],
              ) -> tuple[dict[str, list[tuple[float, int]]], dict[str, list[int]]]:
    """``repeat`` runs of every side, each alone in a fresh process, the order rotated.

    A new process has never touched the memory a side allocates, so every page it needs is
    faulted in from the OS; on a virtual machine the first touch of guest memory also costs the
    host an allocation. That is what one aggregation in a new process costs, not what a
    long-running server whose heap already holds the pages pays. Also returns each run's growth
    of the resident set, where the kernel reports it.
    """
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in names}
    growth: dict[str, list[int]] = {name: [] for name in names}
    order = list(names)
    for r in range(repeat):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            cmd = [sys.executable, "-m", "benchmarks.bench_peer", *argv, "--cold-side", name]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[name].append((float(got["seconds"][0]), int(got["faults"][0])))
            if got["rss_growth"][0] is not None:
                growth[name].append(int(got["rss_growth"][0]))
    return runs, growth


LOOP_ROUNDS = 6


def round_loop(names: Sequence[str], argv: Sequence[str]) -> dict[str, list[float]]:
    """Each side in a fresh process for ``LOOP_ROUNDS`` rounds, replies deserialised anew each
    round, as a server aggregates round after round: seconds per round, by side."""
    out: dict[str, list[float]] = {}
    for name in names:
        cmd = [sys.executable, "-m", "benchmarks.bench_peer", *argv, "--cold-side", name,
               "--rounds", str(LOOP_ROUNDS)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = [float(t) for t in json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]]
    return out


def exact_mean(inputs: Inputs) -> list[npt.NDArray[np.float64]]:
    """The weighted mean in float64, flat per tensor: how far each side is from exact."""
    total = sum(inputs.num_examples)
    out = []
    for i, shape in enumerate(inputs.shapes):
        acc = np.zeros(math.prod(shape))
        for blobs, n in zip(inputs.payloads, inputs.num_examples, strict=True):
            acc += np.frombuffer(blobs[i], dtype="<f4").astype(np.float64) * n
        out.append(acc / total)
    return out


def measure(inputs: Inputs, sides: Sides, repeat: int) -> Measured:
    """The memory pass (which also checks the results), then the timed passes."""
    # Memory, one side at a time; doubles as a warm-up and gives the results to compare.
    peaks: dict[str, int] = {}
    results: dict[str, NDArrays] = {}
    for name, fn in sides.items():
        peaks[name], results[name] = peak_bytes(fn)
    diffs = {name: check_agree(f"{name} vs peer", results["peer"], results[name], inputs.names)
             for name in sides if name != "peer"}
    exact = exact_mean(inputs)
    errors = {
        name: max(float(np.max(np.abs(r.reshape(-1).astype(np.float64) - e)))
                  for r, e in zip(res, exact, strict=True))
        for name, res in results.items()
    }
    del results, exact
    # Time, tracemalloc off, the sides alternating; then again from a trimmed heap (glibc).
    runs = timed_pass(sides, repeat)
    trim = load_malloc_trim()
    med_trim = medians(timed_pass(sides, repeat, trim)) if trim is not None else None
    return Measured(peaks, diffs, errors, runs, medians(runs), med_trim)


def keys(m: Measured, updates: int, params: int, tensors: int, repeat: int) -> dict[str, Any]:
    """The JSON object: the two headline ratios and the raw numbers behind them.

    The headline time ratio is the new-process one (the state of the issue's reference figures,
    see the module docstring); without the new-process pass (``--no-cold``) it is left out rather
    than replaced by another state's figure.
    """
    ours_peak = m.peaks["ours"]
    out: dict[str, Any] = {
        "updates": updates,
        "params": params,
        "tensors": tensors,
        "repeat": repeat,
        "peak_mem_ratio_peer_over_ours": m.peaks["peer"] / ours_peak,
        "ours_peak_bytes": ours_peak,
        "max_abs_diff_ours_vs_peer": m.diffs["ours"],
        "max_abs_err_vs_float64": m.errors,
        "flwr_available": "flwr" in m.peaks,
    }
    states = {"warm": m.med, "trimmed": m.med_trim, "cold": m.med_cold}
    if m.med_cold is not None:
        out["time_ratio_peer_over_ours"] = m.med_cold["peer"][0] / m.med_cold["ours"][0]
    for label, med in states.items():
        if med is None:
            continue
        for name, (secs, faults) in med.items():
            out[f"{name}_seconds_{label}"], out[f"{name}_faults_{label}"] = secs, faults
            if name != "ours":
                out[f"time_ratio_{label}_{name}_over_ours"] = secs / med["ours"][0]
        # The calibration: how much faster a plain numpy streaming fold is than the
        # peer (the issue measured about 7x on its machine).
        if "numpy_stream" in med:
            out[f"calibration_peer_over_numpy_stream_{label}"] = (med["peer"][0]
                                                                 / med["numpy_stream"][0])
    for name, growth in m.rss_cold.items():
        out[f"{name}_rss_growth_bytes_cold"] = growth
    if "peer" in m.rss_cold:
        for name in ("ours", "numpy_stream"):
            if m.rss_cold.get(name):
                out[f"rss_growth_ratio_peer_over_{name}_cold"] = (m.rss_cold["peer"]
                                                                   / m.rss_cold[name])
    for name in m.peaks:
        if name == "ours":
            continue
        out[f"{name}_peak_bytes"] = m.peaks[name]
        if name != "peer":
            out[f"max_abs_diff_{name}_vs_peer"] = m.diffs[name]
            out[f"peak_mem_ratio_{name}_over_ours"] = m.peaks[name] / ours_peak
    return out


def print_table(m: Measured, out: dict[str, Any], quick: bool) -> None:
    """The readable summary."""
    trimmed = "heap trimmed" if m.med_trim is not None else "(no malloc_trim)"
    print(f"\n{'':<12} {'':>12}  {'time, median of ' + str(out['repeat']) + ' runs':^58}")
    print(f"{'side':<12} {'peak allocs':>12}  {'new process':>11} {'faults':>7} {'warm':>9} "
          f"{'faults':>7} {trimmed:>12} {'faults':>7}  {'max |err| vs f64':>17}")
    for name in m.peaks:
        tt, ft = m.med_trim[name] if m.med_trim is not None else (math.nan, 0)
        tc, fc = (m.med_cold[name] if m.med_cold is not None and name in m.med_cold
                  else (math.nan, 0))
        print(f"{name:<12} {fmt_bytes(m.peaks[name]):>12}  {tc:>9.3f} s {fc:>7}"
              f" {m.med[name][0]:>7.3f} s {m.med[name][1]:>7} {tt:>10.3f} s {ft:>7}"
              f"  {m.errors[name]:>17.2e}")
    mem_ratio = out["peak_mem_ratio_peer_over_ours"]
    print(f"\npeak_mem_ratio_peer_over_ours = {mem_ratio:6.1f}  (target >= {TARGET_MEM:g})"
          f"{'' if mem_ratio >= TARGET_MEM else '  BELOW TARGET'}")
    time_ratio = out.get("time_ratio_peer_over_ours")
    if time_ratio is None:
        print("time_ratio_peer_over_ours     = not measured (--no-cold skips the new-process "
              "pass it comes from)")
    else:
        print(f"time_ratio_peer_over_ours     = {time_ratio:6.2f}  (target >= {TARGET_TIME:g})"
              f"{'' if time_ratio >= TARGET_TIME else '  BELOW TARGET'}"
              "  each side in a new process")
    print(f"  warm heap, repeated runs in one process (a server's steady state): "
          f"{out['time_ratio_warm_peer_over_ours']:.2f}")
    if "time_ratio_trimmed_peer_over_ours" in out:
        print(f"  heap trimmed before each run: {out['time_ratio_trimmed_peer_over_ours']:.2f}")
    if "time_ratio_round_loop_later_peer_over_ours" in out:
        print(f"  a server's round loop (fresh replies each round, {out['round_loop_rounds']} "
              f"rounds): first round {out['time_ratio_round_loop_first_peer_over_ours']:.2f}, "
              f"later rounds {out['time_ratio_round_loop_later_peer_over_ours']:.2f} (median)")
    cal = {k.removeprefix("calibration_peer_over_numpy_stream_"): v
           for k, v in out.items() if k.startswith("calibration_")}
    if cal:
        print("calibration, peer / plain numpy streaming fold (the issue measured about 7x): "
              + ", ".join(f"{k} {v:.2f}" for k, v in cal.items()))
    if m.rss_cold:
        growth = ", ".join(f"{name} {fmt_bytes(g)}" for name, g in m.rss_cold.items())
        ratio = out.get("rss_growth_ratio_peer_over_numpy_stream_cold")
        print(f"resident set growth in a new process: {growth}"
              + (f"; peer / numpy_stream {ratio:.1f} (the issue measured about 25x)"
                 if ratio is not None else ""))
    if quick:
        print("(--quick: the memory ratio grows with the number of updates; "
              "acceptance is judged on the full run)")
    print(f"flwr installed: {'yes' if out['flwr_available'] else 'no'}; results agree "
          f"(rtol {RTOL:g}, atol {ATOL:g}; ours vs peer max |diff| "
          f"{out['max_abs_diff_ours_vs_peer']:.2e})")


def build_sides(results: list[tuple[NDArrays, int]], inputs: Inputs, spec: ModelSpec,
                base: dict[str, F32]) -> Sides:
    """Every side as a call on the same deserialised replies (``flwr`` when it is installed)."""
    sides: Sides = {
        "peer": lambda: run_peer(results),
        "ours": lambda: run_ours(results, inputs.names, spec, base),
        "numpy_stream": lambda: run_numpy_stream(results),
    }
    flwr_aggregate = load_flwr()
    if flwr_aggregate is not None:
        agg = flwr_aggregate
        sides["flwr"] = lambda: run_peer(results, agg)
    return sides


def run_cold_side(name: str, rounds: int, inputs: Inputs, spec: ModelSpec,
                  base: dict[str, F32]) -> int:
    """In a fresh process (see ``cold_pass`` and ``round_loop``): one aggregation per round by
    side ``name``, each on replies deserialised anew; prints one JSON line of the measurements."""
    per_round = []
    for _ in range(rounds):
        # The previous round's replies are dropped before the next are made, as a server does.
        results = deserialize(inputs)
        per_round.append(resident_growth(build_sides(results, inputs, spec, base)[name]))
        del results
    print(json.dumps({"seconds": [t for t, _, _ in per_round],
                      "faults": [f for _, f, _ in per_round],
                      "rss_growth": [g for _, _, g in per_round]}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print a table, optionally write the JSON keys; 0 on success."""
    parser = argparse.ArgumentParser(prog="bench peer",
                                     description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_UPDATES} updates of {QUICK_PARAMS:,} parameters")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    parser.add_argument("--repeat", type=int, default=0,
                        help=f"timed runs per side (default {FULL_REPEAT}, --quick {QUICK_REPEAT})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cold", action="store_true",
                        help="skip the pass that runs each side in a new process")
    parser.add_argument("--cold-side", metavar="SIDE", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    updates, params = (QUICK_UPDATES, QUICK_PARAMS) if args.quick else (FULL_UPDATES, FULL_PARAMS)
    repeat = args.repeat or (QUICK_REPEAT if args.quick else FULL_REPEAT)

    t0 = time.perf_counter()
    inputs = make_inputs(updates, params, args.seed)
    spec = ModelSpec.from_weights(dict(zip(inputs.names, (np.empty(s) for s in inputs.shapes),
                                           strict=True)))
    base = {name: np.zeros(shape, dtype=np.float32)
            for name, shape in zip(inputs.names, inputs.shapes, strict=True)}
    if args.cold_side is None:
        print(f"inputs: {updates} updates x {params:,} float32 parameters in "
              f"{len(inputs.names)} tensors ({time.perf_counter() - t0:.1f} s to make)")
    warmup()

    default = StrategyConfig().fold_threads
    set_fold_threads(default)  # "ours" folds as the aggregator does by default
    if args.cold_side is not None:
        return run_cold_side(args.cold_side, args.rounds, inputs, spec, base)
    # The replies as Flower holds them after deserialising (each its own float32 arrays): the
    # inputs of both sides, made before anything is measured.
    results = deserialize(inputs)
    sides = build_sides(results, inputs, spec, base)
    m = measure(inputs, sides, repeat)
    loop: dict[str, list[float]] = {}
    if not args.no_cold:
        forward = ["--seed", str(args.seed)] + (["--quick"] if args.quick else [])
        cold_runs, growth = cold_pass(list(sides), repeat, forward)
        m.med_cold = medians(cold_runs)
        m.rss_cold = {name: int(statistics.median(g)) for name, g in growth.items() if g}
        loop = round_loop(["peer", "ours"], forward)
    out = keys(m, updates, params, len(inputs.names), repeat)
    if loop:
        later = {name: statistics.median(ts[1:]) for name, ts in loop.items()}
        out |= {
            "round_loop_rounds": LOOP_ROUNDS,
            "peer_seconds_round_loop": loop["peer"], "ours_seconds_round_loop": loop["ours"],
            "time_ratio_round_loop_first_peer_over_ours": loop["peer"][0] / loop["ours"][0],
            "time_ratio_round_loop_later_peer_over_ours": later["peer"] / later["ours"],
        }
    out["fold_threads"] = default
    print_table(m, out, args.quick)
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
