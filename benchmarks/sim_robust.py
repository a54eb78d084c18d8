"""In-process simulation of the norm bound under attack (no MQTT), used to choose its defaults.

The demo setting (digits, MLP, every device every round) with ``--attackers`` devices replaced
by attackers that send, at the weight cap, either +3e38 in every coordinate (``huge``) or
Gaussian noise of sigma 10 (``noise``); they answer first, so they are always in the bootstrap.
The bound is ``aggregator.robust.NormBound`` itself (the rule the aggregator runs); the fold is
the same ``w * s * x`` in float64. Prints final held-out accuracy, and its drop from the clean
run (all devices honest, no bound), for each multiplier, cap and seed::

    python benchmarks/sim_robust.py --partition iid --seed 0 1 2
    python benchmarks/sim_robust.py --partition shards --multiplier 2 3 4 --cap 72 150 1000
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from aggregator.robust import NormBound, bootstrap_size
from device_agent.trainers import MLPTrainer, TrainConfig
from fedmq.config import RobustConfig
from fedmq.datasets import load_digits_split, partition
from fedmq.models import DEFAULT_LAYER_SIZES, flatten, init_mlp, unflatten

F64 = npt.NDArray[np.float64]


def simulate(*, scheme: Literal["iid", "shards"], seed: int, attack: str | None,
             attackers: int, cap: int, robust: RobustConfig | None, devices: int = 20,
             rounds: int = 20) -> float:
    """Final held-out accuracy of one run (``robust`` None: no bound at all)."""
    x_tr, y_tr, x_te, y_te = load_digits_split(seed)
    parts = partition(y_tr, devices, scheme, seed)
    trainers = [MLPTrainer(x_tr[p], y_tr[p], 10) for p in parts]
    test = MLPTrainer(x_te, y_te, 10)
    cfg = TrainConfig(seed=seed)
    model = init_mlp(list(DEFAULT_LAYER_SIZES), seed)
    rng = np.random.default_rng(seed + 99)
    bound = NormBound(robust, bootstrap_size(devices, devices)) if robust else None
    for r in range(rounds):
        base = flatten(model)
        ups: list[tuple[F64, float]] = []
        for d, t in enumerate(trainers):
            if attack is not None and d < attackers:
                delta = (np.full(base.size, 3e38) if attack == "huge"
                         else rng.normal(0.0, 10.0, base.size))
                ups.append((delta, float(cap)))
                continue
            fit = t.fit(model, cfg, r * devices + d)
            ups.append((flatten(fit.weights) - base, float(min(fit.num_examples, cap))))
        norms = [math.sqrt(float(np.dot(u, u))) for u, _ in ups]
        if bound is not None:
            for n in norms:  # every update is accepted; held ones fold once the bound is known
                bound.observe(n)
            if bound.bootstrapping:
                bound.start()
        acc = np.zeros(base.size)
        total = 0.0
        for (u, w), n in zip(ups, norms, strict=True):
            s = bound.scale(n) if bound is not None else 1.0
            acc += (w * s) * u
            total += w
        model = unflatten(base + acc / total, model)
        if bound is not None:
            bound.end_round()
    accuracy = test.evaluate(model).accuracy
    assert accuracy is not None  # a classifier's evaluation has one
    return float(accuracy)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--partition", choices=["iid", "shards"], default="iid")
    p.add_argument("--seed", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--multiplier", type=float, nargs="+", default=[2.0, 3.0, 4.0])
    p.add_argument("--cap", type=int, nargs="+", default=[72, 150, 1000],
                   help="weight caps (72 is the demo's largest shard, its max_examples)")
    p.add_argument("--attackers", type=int, default=2)
    args = p.parse_args(argv)
    print(f"{'seed':>4} {'cap':>5} {'mult':>4}  clean  clip-clean  huge-drop  noise-drop")
    for seed in args.seed:
        clean = simulate(scheme=args.partition, seed=seed, attack=None, attackers=0,
                         cap=10**9, robust=None)
        for cap in args.cap:
            for m in args.multiplier:
                rc = RobustConfig(clip_multiplier=m)
                clipped = simulate(scheme=args.partition, seed=seed, attack=None,
                                   attackers=0, cap=cap, robust=rc)
                drops = [clean - simulate(scheme=args.partition, seed=seed, attack=a,
                                          attackers=args.attackers, cap=cap, robust=rc)
                         for a in ("huge", "noise")]
                print(f"{seed:>4} {cap:>5} {m:>4g}  {clean:.4f}  {clipped - clean:+.4f}"
                      f"     {drops[0]:+.4f}     {drops[1]:+.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
