"""Fused fold kernels against the memory-bandwidth floor and against the obvious numpy fold.

For each codec (fp32, fp16, int8 with blocks of 256, topk at 1% with int8 values) one update of
10M parameters (``--quick``: 1M) is folded into a float64 accumulator three ways, alternated within
each repetition so drift in machine load hits all of them alike:

``ours``
    ``KERNELS[codec].fold(acc, t, w)``: the public wrapper (argument checks included) and its
    fused kernel over the encoded bytes.
``numpy``
    the obvious numpy fold with the reference decoder, ``acc += w * decode(t)``.
``copy``
    ``np.copyto`` of one float64 array of the same length into another: the memory-bandwidth
    floor (it reads and writes as many accumulator bytes as a dense fold does).

Reported, from the medians of the repetitions: ``fold_<codec>_vs_copy`` = ours / copy (1.0 = the
fold runs at memory bandwidth; targets: fp32 and int8 <= 1.5) and ``fold_<codec>_vs_numpy`` =
numpy / ours (the speed-up; target >= 3 for every codec)::

    python -m benchmarks kernels [--quick] [--json PATH] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from aggregator.kernels import KERNELS, set_fold_threads, warmup
from fedmq.compression import decode, encode
from fedmq.config import StrategyConfig
from fedmq.wire import Tensor

FULL_PARAMS = 10_000_000
QUICK_PARAMS = 1_000_000
FULL_REPEAT = 15
QUICK_REPEAT = 5
WEIGHT = 37.0  # a typical num_examples



class Case(NamedTuple):
    """Encoder options of one measured codec."""

    codec: str
    block: int = 256
    fraction: float = 0.01
    values: str = "int8"


#: codec → its options (the keys are fold_<codec>_...).
CASES: dict[str, Case] = {
    "fp32": Case("fp32"),
    "fp16": Case("fp16"),
    "int8": Case("int8", block=256),
    "topk": Case("topk", block=256, fraction=0.01, values="int8"),
}
TARGET_VS_COPY = {"fp32": 1.5, "int8": 1.5}
TARGET_VS_NUMPY = 3.0

F64 = npt.NDArray[np.float64]


def _encode(x: npt.NDArray[np.float32], c: Case) -> Tensor:
    return encode("w", x, c.codec, block=c.block, fraction=c.fraction, values=c.values)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _ours(acc: F64, t: Tensor) -> Callable[[], None]:
    fold = KERNELS[t.codec].fold
    return lambda: fold(acc, t, WEIGHT)


def _numpy(acc: F64, t: Tensor) -> Callable[[], None]:
    def run() -> None:
        nonlocal acc
        acc += WEIGHT * decode(t)

    return run


def measure(params: int, repeat: int) -> dict[str, float | int | str]:
    """Median times of every side and the ratios, as the JSON object the CLI writes."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(params) * 0.01).astype(np.float32)  # a model delta
    tensors = {label: _encode(x, opts) for label, opts in CASES.items()}
    acc = np.zeros(params)
    src = rng.standard_normal(params)
    dst = np.empty(params)

    sides: dict[str, Callable[[], object]] = {"copy": lambda: np.copyto(dst, src)}
    for label, t in tensors.items():
        sides[f"ours_{label}"] = _ours(acc, t)
        sides[f"numpy_{label}"] = _numpy(acc, t)

    warmup()  # compile (or load) the kernels
    for fn in sides.values():  # and touch every page once
        fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(repeat):
        # Rotate the order each repetition: no side always runs right after the same one.
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(_timed(sides[name]))

    med = {name: statistics.median(ts) for name, ts in times.items()}
    out: dict[str, float | int | str] = {}
    for label in CASES:
        out[f"fold_{label}_vs_copy"] = round(med[f"ours_{label}"] / med["copy"], 3)
        out[f"fold_{label}_vs_numpy"] = round(med[f"numpy_{label}"] / med[f"ours_{label}"], 2)
    out["copy_ms"] = round(med["copy"] * 1e3, 3)
    for label in CASES:
        out[f"fold_{label}_ms"] = round(med[f"ours_{label}"] * 1e3, 3)
        out[f"numpy_{label}_ms"] = round(med[f"numpy_{label}"] * 1e3, 3)
        t = tensors[label]
        out[f"encoded_{label}_bytes"] = len(t.data) + len(t.scales) + len(t.indices)
    out["params"] = params
    out["repeat"] = repeat
    return out


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(r: dict[str, float | int | str]) -> str:
    """The table printed after a run."""
    params = int(r["params"])
    lines = [
        f"fold of one update of {params:,} parameters into float64; median of {r['repeat']} "
        f"alternated runs; np.copyto of {params:,} float64 = {float(r['copy_ms']):.2f} ms "
        f"({2 * 8 * params / float(r['copy_ms']) / 1e6:.1f} GB/s read+write)",
        "",
        f"{'codec':<6} {'encoded':>10} {'ours ms':>9} {'numpy ms':>9} {'vs copy':>8} "
        f"{'target':>7} {'vs numpy':>9} {'target':>7}",
    ]
    for label in CASES:
        vs_copy = float(r[f"fold_{label}_vs_copy"])
        vs_numpy = float(r[f"fold_{label}_vs_numpy"])
        target = TARGET_VS_COPY.get(label)
        copy_mark = f"<={target} {_mark(vs_copy <= target)}" if target else "-"
        lines.append(
            f"{label:<6} {int(r[f'encoded_{label}_bytes']) / 1e6:>8.2f}MB "
            f"{float(r[f'fold_{label}_ms']):>9.2f} {float(r[f'numpy_{label}_ms']):>9.2f} "
            f"{vs_copy:>8.3f} {copy_mark:>7} {vs_numpy:>9.2f} "
            f">={TARGET_VS_NUMPY:g} {_mark(vs_numpy >= TARGET_VS_NUMPY)}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``kernels [--quick] [--json PATH] [--repeat N]``; always 0 (misses are printed)."""
    p = argparse.ArgumentParser(prog="bench kernels", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_PARAMS:,} parameters and {QUICK_REPEAT} repetitions")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the results here")
    p.add_argument("--repeat", type=int, default=None,
                   help=f"timed runs per side (default {FULL_REPEAT}, --quick {QUICK_REPEAT})")
    args = p.parse_args(argv)
    repeat = args.repeat or (QUICK_REPEAT if args.quick else FULL_REPEAT)
    params = QUICK_PARAMS if args.quick else FULL_PARAMS
    # The headline keys use the aggregator's default ([strategy] fold_threads = 0: every core);
    # the same folds on one core are measured and reported too, with the suffix _1thread.
    default = StrategyConfig().fold_threads
    set_fold_threads(default)
    result = measure(params, repeat)
    print(f"fold_threads = {default} (the aggregator's default: all {os.cpu_count()} cores)")
    print(report(result), flush=True)
    set_fold_threads(1)
    single = measure(params, repeat)
    print("\nfold_threads = 1")
    print(report(single), flush=True)
    for key, value in single.items():
        if key.startswith("fold_") and ("_vs_" in key or key.endswith("_ms")):
            result[f"{key}_1thread"] = value
    result["fold_threads"] = default
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
