"""The ``peer`` benchmark: our streaming FedAvg fold against the way Flower aggregates.

Both sides start from the same encoded replies (each a list of little-endian float32 ``bytes``,
one per tensor, as they come off the wire) and the same ``num_examples`` weights, made before
anything is measured. Each side's measured region covers what it needs to turn those bytes into
the new model, and nothing else:

peer (Flower's ``flwr.server.strategy.aggregate.aggregate``, reproduced)
    Deserialise every reply into its own arrays (Flower's ``bytes_to_ndarray`` makes new arrays;
    here ``np.frombuffer(...).copy()``), collect all of them in one list, then make a scaled copy
    of every array (``layer * num_examples``) and reduce over the clients layer by layer
    (``reduce(np.add, ...) / num_examples_total``). Flower computes in float32, as here (the
    weights are Python ints, so numpy keeps float32).
ours (``aggregator.strategies.FedAvg``)
    ``FedAvg(spec)`` (the float64 accumulator is allocated inside the measured region),
    ``init(base)`` with a zero base so the result is the weighted mean, then each reply's tensors
    (``Tensor`` objects over the same bytes, zero-copy) folded one reply at a time, then
    ``finalize()``. Never more than one reply is in hand.

Peak Python allocations come from tracemalloc (numpy reports its buffers to it), one side at a
time, in a pass of their own; wall time comes from ``time.perf_counter`` in separate passes
without tracemalloc, the sides alternating, and the medians are compared. Both results must
agree (``np.allclose``, rtol 1e-5) or the benchmark fails. If ``flwr`` is importable its own
``aggregate()`` is measured the same way, on the same deserialised arrays. From the repo root::

    python -m benchmarks.bench_peer [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import json
import math
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from aggregator.kernels import warmup
from aggregator.spec import ModelSpec
from aggregator.strategies import FedAvg
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


def run_peer(inputs: Inputs, aggregate: Aggregate = flower_style_aggregate) -> NDArrays:
    """Peer side: deserialise all replies, then aggregate them all at once."""
    return aggregate(deserialize(inputs))


def run_ours(inputs: Inputs, spec: ModelSpec, base: dict[str, F32]) -> NDArrays:
    """Our side: fold each reply's tensors (zero-copy over its bytes) as it comes, then finalize."""
    strategy = FedAvg(spec)
    strategy.init(base)
    for blobs, n in zip(inputs.payloads, inputs.num_examples, strict=True):
        tensors = [
            Tensor(name=name, dtype="float32", shape=shape, codec="fp32", data=b)
            for name, shape, b in zip(inputs.names, inputs.shapes, blobs, strict=True)
        ]
        strategy.fold(tensors, n)
    model = strategy.finalize()
    return [model[name] for name in inputs.names]


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


def seconds(fn: Callable[[], NDArrays]) -> float:
    """Wall time of one call (tracemalloc off); the result is dropped outside the timing."""
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - t0
    del out
    return elapsed


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
    return f"{n / 2**20:10.1f} MiB"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print a table, optionally write the JSON keys; 0 on success."""
    parser = argparse.ArgumentParser(prog="bench peer", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_UPDATES} updates of {QUICK_PARAMS:,} parameters")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    parser.add_argument("--repeat", type=int, default=0,
                        help=f"timed runs per side (default {FULL_REPEAT}, --quick {QUICK_REPEAT})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    updates, params = (QUICK_UPDATES, QUICK_PARAMS) if args.quick else (FULL_UPDATES, FULL_PARAMS)
    repeat = args.repeat or (QUICK_REPEAT if args.quick else FULL_REPEAT)

    t0 = time.perf_counter()
    inputs = make_inputs(updates, params, args.seed)
    spec = ModelSpec.from_weights(dict(zip(inputs.names, (np.empty(s) for s in inputs.shapes),
                                           strict=True)))
    base = {name: np.zeros(shape, dtype=np.float32)
            for name, shape in zip(inputs.names, inputs.shapes, strict=True)}
    print(f"inputs: {updates} updates x {params:,} float32 parameters in "
          f"{len(inputs.names)} tensors ({time.perf_counter() - t0:.1f} s to make)")
    warmup()

    sides: dict[str, Callable[[], NDArrays]] = {
        "peer": lambda: run_peer(inputs),
        "ours": lambda: run_ours(inputs, spec, base),
    }
    flwr_aggregate = load_flwr()
    if flwr_aggregate is not None:
        agg = flwr_aggregate
        sides["flwr"] = lambda: run_peer(inputs, agg)

    # Memory, one side at a time; doubles as a warm-up and gives the results to compare.
    peaks: dict[str, int] = {}
    results: dict[str, NDArrays] = {}
    for name, fn in sides.items():
        peaks[name], results[name] = peak_bytes(fn)
    diffs = {name: check_agree(f"{name} vs peer", results["peer"], results[name], inputs.names)
             for name in sides if name != "peer"}
    # A float64 reference, to say how far each side is from the exact weighted mean.
    total = sum(inputs.num_examples)
    exact = [
        sum((np.frombuffer(blobs[i], dtype="<f4").astype(np.float64) * n
             for blobs, n in zip(inputs.payloads, inputs.num_examples, strict=True)),
            start=np.zeros(math.prod(s))) / total
        for i, s in enumerate(inputs.shapes)
    ]
    err_vs_exact = {
        name: max(float(np.max(np.abs(r.reshape(-1).astype(np.float64) - e)))
                  for r, e in zip(res, exact, strict=True))
        for name, res in results.items()
    }
    del results, exact

    # Time, tracemalloc off, the sides alternating (rotated each repeat).
    times: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for r in range(repeat):
        for name in order[r % len(order):] + order[:r % len(order)]:
            times[name].append(seconds(sides[name]))
    med = {name: statistics.median(ts) for name, ts in times.items()}

    out: dict[str, Any] = {
        "updates": updates,
        "params": params,
        "tensors": len(inputs.names),
        "repeat": repeat,
        "peer_peak_bytes": peaks["peer"],
        "ours_peak_bytes": peaks["ours"],
        "peer_seconds": med["peer"],
        "ours_seconds": med["ours"],
        "peak_mem_ratio_peer_over_ours": peaks["peer"] / peaks["ours"],
        "time_ratio_peer_over_ours": med["peer"] / med["ours"],
        "max_abs_diff_ours_vs_peer": diffs["ours"],
        "max_abs_err_vs_float64": err_vs_exact,
        "flwr_available": flwr_aggregate is not None,
    }
    if flwr_aggregate is not None:
        out |= {
            "flwr_peak_bytes": peaks["flwr"],
            "flwr_seconds": med["flwr"],
            "max_abs_diff_flwr_vs_peer": diffs["flwr"],
            "peak_mem_ratio_flwr_over_ours": peaks["flwr"] / peaks["ours"],
            "time_ratio_flwr_over_ours": med["flwr"] / med["ours"],
        }

    print(f"\n{'side':<6} {'peak allocations':>16} {'median time':>12} {'min':>9} {'max':>9}"
          f"  {'max |err| vs float64':>20}")
    for name in sides:
        ts = times[name]
        print(f"{name:<6} {fmt_bytes(peaks[name]):>16} {med[name]:>10.3f} s {min(ts):>7.3f} s "
              f"{max(ts):>7.3f} s  {err_vs_exact[name]:>20.2e}")
    mem_ratio = out["peak_mem_ratio_peer_over_ours"]
    time_ratio = out["time_ratio_peer_over_ours"]
    print(f"\npeak_mem_ratio_peer_over_ours = {mem_ratio:6.1f}  (target >= {TARGET_MEM:g})"
          f"{'' if mem_ratio >= TARGET_MEM else '  BELOW TARGET'}")
    print(f"time_ratio_peer_over_ours     = {time_ratio:6.2f}  (target >= {TARGET_TIME:g})"
          f"{'' if time_ratio >= TARGET_TIME else '  BELOW TARGET'}")
    print(f"flwr installed: {'yes' if flwr_aggregate is not None else 'no'}; results agree "
          f"(rtol {RTOL:g}, atol {ATOL:g}; ours vs peer max |diff| {diffs['ours']:.2e})")

    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
