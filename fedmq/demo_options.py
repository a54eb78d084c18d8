"""``fedmq demo``'s command line: its options and the check of their values (the demo itself
is ``fedmq.demo``)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fedmq import demo_privacy, demo_signing
from fedmq.config import STRATEGY_DEFAULTS, CompressionConfig
from fedmq.models import MAX_BATCH_SIZE, MAX_PROXIMAL_MU

__all__ = ["MAX_DEVICES", "add_arguments", "check_knobs"]

#: Most simulated devices: each is a paho client (3 file descriptors), and paho's select()
#: loop sees descriptors below 1024 only; the aggregator, the watcher and the broker need some.
MAX_DEVICES = 300


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's command-line options."""
    p.add_argument("--task", choices=("train", "statistics"), default="train",
                   help="train: federated learning on digits; statistics: federated analytics "
                        "on river's room-occupancy readings, one device per day "
                        "(docs/analytics.md; needs the analytics extra)")
    p.add_argument("--devices", type=int, default=None,
                   help="simulated devices (default 20; statistics: the first N days of 7)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds to run (default 20; statistics: 1)")
    p.add_argument("--partition", choices=("iid", "shards"), default="iid",
                   help="iid: equal random split; shards: 2 label-sorted shards per device")
    p.add_argument("--broker", default="auto",
                   help="auto | mosquitto | embedded | HOST:PORT (default auto)")
    p.add_argument("--seed", type=int, default=0, help="data split, partition and model seed")
    p.add_argument("--model", choices=("mlp", "softmax"), default="mlp")
    p.add_argument("--epochs", type=int, default=None, help="local epochs per round")
    p.add_argument("--lr", type=float, default=None, help="local learning rate")
    p.add_argument("--batch-size", type=_batch_size, default=None,
                   help="local minibatch size, or 'full' for the whole local set (FedSGD with "
                        "--epochs 1)")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="client sampling rate C: the fraction of devices asked to train each "
                        "round (default 1.0: all; below 1 a round closes 2 s after half of the "
                        "expected sample is in)")
    p.add_argument("--proximal-mu", type=float, default=0.0,
                   help="FedProx: mu of the proximal term the devices add to their loss "
                        "(default 0: FedAvg)")
    p.add_argument("--strategy", choices=list(STRATEGY_DEFAULTS), default="fedavg",
                   help="how the aggregator moves the model by the round's mean delta "
                        "(default fedavg; docs/learning.md), with its default settings")
    p.add_argument("--server-lr", type=float, default=None,
                   help="the strategy's server learning rate (default: the strategy's own)")
    p.add_argument("--clip-norm", type=float, default=None,
                   help="a fixed per-update L2 norm bound instead of the adaptive one (with "
                        f"--noise-multiplier: the privacy clip, default "
                        f"{demo_privacy.DEMO_DP_CLIP:g})")
    p.add_argument("--mode", choices=("sync", "async"), default="sync",
                   help="sync rounds, or async buffered aggregation (FedBuff): a new model "
                        "every half-the-devices updates, devices train whenever ready "
                        "(docs/rounds.md); --rounds then counts model versions")
    p.add_argument("--slow-fraction", type=float, default=0.0,
                   help="this fraction of the devices trains --slow-factor times slower "
                        "(default 0)")
    p.add_argument("--slow-factor", type=float, default=10.0,
                   help="how many times slower the slow devices train (default 10)")
    p.add_argument("--codec", choices=("fp32", "fp16", "int8", "topk"), default="fp32",
                   help="how devices compress updates (default fp32)")
    # The config's default, so the demo shows what a deployment gets.
    topk = CompressionConfig().fraction
    p.add_argument("--topk-fraction", type=float, default=topk,
                   help=f"topk: fraction of entries each update keeps (default {topk:g}, as "
                        "[compression] fraction)")
    p.add_argument("--target", type=float, default=None, metavar="ACC",
                   help="stop early once the central test accuracy reaches ACC (the rounds "
                        "to a target accuracy, as benchmarks/bench_learning.py reads them)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH",
                   help="write the per-round results as JSON here")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="give up after this many seconds (default 300)")
    demo_signing.add_arguments(p)
    demo_privacy.add_arguments(p)
    p.add_argument("--secure-aggregation", action="store_true",
                   help="devices mask their updates (SecAgg+): the aggregator sees only their "
                        "sum (docs/security.md)")


def check_knobs(args: argparse.Namespace) -> str:
    """The first out-of-range knob, said as the option name, or ''."""
    if args.devices < 1 or args.rounds < 1:
        return "--devices and --rounds must be at least 1"
    if args.devices > MAX_DEVICES:
        return (f"--devices {args.devices} is more than this demo holds: every simulated device "
                "is a paho client in this one process, and paho's network loop (select()) "
                f"handles about {MAX_DEVICES} of them; for a larger fleet run an aggregator and "
                "`fedmq simulate --devices N --broker HOST:PORT` (docs/scaling.md)")
    if not 0.0 < args.fraction <= 1.0:
        return f"--fraction {args.fraction} must be in (0, 1]"
    if not (math.isfinite(args.proximal_mu) and 0.0 <= args.proximal_mu <= MAX_PROXIMAL_MU):
        return f"--proximal-mu {args.proximal_mu} must be in [0, {MAX_PROXIMAL_MU:g}]"
    if args.clip_norm is not None and not (math.isfinite(args.clip_norm) and args.clip_norm > 0):
        return f"--clip-norm {args.clip_norm} must be a positive number"
    server_lr = getattr(args, "server_lr", None)
    if server_lr is not None and not (math.isfinite(server_lr) and server_lr > 0):
        return f"--server-lr {server_lr} must be a positive number"
    target = getattr(args, "target", None)
    if target is not None and not 0.0 < target <= 1.0:
        return f"--target {target} must be in (0, 1]"
    if not 0.0 <= args.slow_fraction <= 1.0:
        return f"--slow-fraction {args.slow_fraction} must be in [0, 1]"
    if not (math.isfinite(args.slow_factor) and args.slow_factor >= 1.0):
        return f"--slow-factor {args.slow_factor} must be at least 1"
    if getattr(args, "secure_aggregation", False) and getattr(args, "mode", "sync") != "sync":
        return "--secure-aggregation works with --mode sync only"
    return demo_privacy.check_knobs(args)


def _batch_size(text: str) -> int:
    """``--batch-size``: a positive integer, or ``full`` (the whole local set)."""
    if text == "full":
        return MAX_BATCH_SIZE  # trainers use min(batch_size, local examples)
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer or 'full'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer or 'full'")
    return value
