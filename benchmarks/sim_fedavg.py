"""In-process FedAvg simulation on digits (no MQTT), used to tune the training defaults.

Each round every device fits from the global model with the built-in trainer; the server takes
the num_examples-weighted mean of the returned weights (in float64, then float32) and the model
is scored on the held-out test split. Prints per-round accuracy for one seed, or a summary table
for several. From the repo root, with fedmq installed (``pip install -e '.[demo]'``) or
``PYTHONPATH=.``::

    python benchmarks/sim_fedavg.py --partition iid --rounds 20 --seed 0 1 2 3 4
    python benchmarks/sim_fedavg.py --partition shards --rounds 30 --seed 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from device_agent.trainers import FitResult, MLPTrainer, TrainConfig
from fedmq.datasets import load_digits_split, partition
from fedmq.models import DEFAULT_LAYER_SIZES, Weights, init_mlp

NUM_CLASSES = 10


@dataclass
class SimResult:
    """Held-out accuracy after each round, and the wall time of the run."""

    accuracy: list[float]
    seconds: float


def fedavg(results: Sequence[FitResult]) -> Weights:
    """Weighted mean of the devices' weights by num_examples (float64 sums, float32 result)."""
    total = sum(r.num_examples for r in results)
    out: Weights = {}
    for name in results[0].weights:
        acc = np.zeros(results[0].weights[name].shape, dtype=np.float64)
        for r in results:
            acc += r.num_examples * r.weights[name].astype(np.float64)
        out[name] = (acc / total).astype(np.float32)
    return out


def simulate(
    *,
    devices: int,
    rounds: int,
    scheme: str,
    seed: int,
    config: TrainConfig,
    layers: Sequence[int],
) -> SimResult:
    """Run FedAvg with all devices every round; return held-out accuracy after each round."""
    if scheme not in ("iid", "shards"):
        raise ValueError(f"partition must be 'iid' or 'shards', got {scheme!r}")
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    parts = partition(y_tr, devices, "iid" if scheme == "iid" else "shards", seed)
    trainers = [MLPTrainer(x_tr[p], y_tr[p], NUM_CLASSES) for p in parts]
    test = MLPTrainer(x_te, y_te, NUM_CLASSES)
    cfg = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr, seed=seed)
    model = init_mlp(layers, seed)
    acc: list[float] = []
    t0 = time.perf_counter()
    for rnd in range(rounds):
        # Per-device round seeds, like the agent deriving one from (round, device id).
        fits = [t.fit(model, cfg, rnd * devices + d) for d, t in enumerate(trainers)]
        model = fedavg(fits)
        accuracy = test.evaluate(model).accuracy
        assert accuracy is not None  # a classifier's evaluation has one
        acc.append(accuracy)
    return SimResult(accuracy=acc, seconds=time.perf_counter() - t0)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point."""
    d = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--partition", choices=["iid", "shards"], default="iid")
    p.add_argument("--seed", type=int, nargs="+", default=[0], help="one or more seeds")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument(
        "--layers",
        type=str,
        default=",".join(map(str, DEFAULT_LAYER_SIZES)),
        help="comma-separated layer sizes, e.g. 64,64,10",
    )
    args = p.parse_args(argv)
    layers = [int(s) for s in args.layers.split(",")]
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    print(
        f"FedAvg digits: {args.devices} devices, {args.rounds} rounds, {args.partition}, "
        f"E={config.epochs} B={config.batch_size} lr={config.lr} layers={layers}"
    )
    finals = []
    for seed in args.seed:
        res = simulate(
            devices=args.devices,
            rounds=args.rounds,
            scheme=args.partition,
            seed=seed,
            config=config,
            layers=layers,
        )
        if len(args.seed) == 1:
            for r, a in enumerate(res.accuracy, 1):
                print(f"  round {r:3d}  accuracy {a:.4f}")
        print(
            f"seed {seed}: final {res.accuracy[-1]:.4f}  best {max(res.accuracy):.4f}  "
            f"({res.seconds:.1f} s)"
        )
        finals.append(res.accuracy[-1])
    print(f"final accuracy: min {min(finals):.4f}  mean {float(np.mean(finals)):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
