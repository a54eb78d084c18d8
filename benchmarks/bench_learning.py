"""Learning over a real Mosquitto: the shape of McMahan et al.'s Table 2 on digits, the non-IID
remedies, sync versus async wall time, and the aggregator's memory against fleet size.

Every learning cell is one ``fedmq demo`` process (its own Mosquitto, aggregator and 20 device
agents) run with ``--target``: it stops at the first round whose global model reaches the target
accuracy on the demo's central held-out test split (450 digits no device trains on, scored from
the model topic; the demo's JSON ``rounds[].accuracy``). Rounds to target are read off that
curve's running maximum (the first round where it reaches the target); a run that never does
within its round cap counts as "more than the cap", and the median of three seeds is reported as
">cap" when two of them miss. Nothing is filled in: a cell whose demo option does not exist
(yet) is reported as not run.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import learning_rss

IID_TARGET = 0.95
SHARDS_TARGET = 0.90
#: FedSGD's local learning rate: the best of 0.5, 1.0 and 2.0 on IID at C = 1 (47 rounds to
#: 0.95 against 58 and 102; at 2.0 the adaptive norm bound clips updates).
FEDSGD_LR = 1.0
FEDPROX_MU = 0.1


@dataclass(frozen=True)
class Cell:
    """One configuration, run once per seed."""

    group: str  # "table2", "remedies" or "async"
    partition: str
    method: str
    fraction: float
    target: float
    cap: int
    options: tuple[str, ...]
    needs: str = ""  # a demo option this cell cannot run without


@dataclass
class Run:
    """One demo run of a cell."""

    seed: int
    rounds_to_target: int | None  # None: missed within the cap
    wall_to_target: float | None
    curve: list[float] = field(default_factory=list)
    error: str = ""


def _fedsgd() -> tuple[str, ...]:
    return ("--epochs", "1", "--batch-size", "full", "--lr", str(FEDSGD_LR))


def _fedavg(epochs: int) -> tuple[str, ...]:
    return ("--epochs", str(epochs), "--batch-size", "10")


def table2_cells(quick: bool) -> list[Cell]:
    """FedSGD and FedAvg (E = 5, 20; B = 10) at C = 0.1, 0.5, 1 on IID and label shards."""
    if quick:  # C = 1 rounds take a fraction of a second; below 1 a round waits a 2 s grace
        return [Cell("table2", "iid", "FedSGD", 1.0, IID_TARGET, 120, _fedsgd()),
                Cell("table2", "iid", "FedAvg E=5", 1.0, IID_TARGET, 30, _fedavg(5))]
    cells = []
    for partition, target in (("iid", IID_TARGET), ("shards", SHARDS_TARGET)):
        for c in (0.1, 0.5, 1.0):
            sgd_cap = 150 if c == 1.0 else 90
            avg_cap = 50 if partition == "iid" else 60
            cells += [Cell("table2", partition, "FedSGD", c, target, sgd_cap, _fedsgd()),
                      Cell("table2", partition, "FedAvg E=5", c, target, avg_cap, _fedavg(5)),
                      Cell("table2", partition, "FedAvg E=20", c, target, avg_cap, _fedavg(20))]
    return cells


def remedy_cells(quick: bool) -> list[Cell]:
    """Plain FedAvg (E = 5, B = 10) on label shards against FedProx, FedAvgM and FedAdam, at
    C = 0.1 (C = 1 with --quick): the setting where plain FedAvg oscillates (issue 11)."""
    c, cap = (1.0, 40) if quick else (0.1, 60)
    base = _fedavg(5)
    return [Cell("remedies", "shards", "FedAvg", c, SHARDS_TARGET, cap, base),
            Cell("remedies", "shards", "FedProx", c, SHARDS_TARGET, cap,
                 (*base, "--proximal-mu", str(FEDPROX_MU))),
            Cell("remedies", "shards", "FedAvgM", c, SHARDS_TARGET, cap,
                 (*base, "--strategy", "fedavgm"), needs="--strategy"),
            Cell("remedies", "shards", "FedAdam", c, SHARDS_TARGET, cap,
                 (*base, "--strategy", "fedadam"), needs="--strategy")]


def async_cells(quick: bool) -> list[Cell]:
    """FedAvg (E = 5, B = 10, C = 1) on IID with 30% of the devices 10x slower, sync and async."""
    slow = (*_fedavg(5), "--slow-fraction", "0.3", "--slow-factor", "10")
    return [Cell("async", "iid", "sync FedAvg", 1.0, IID_TARGET, 30 if quick else 50, slow),
            Cell("async", "iid", "async FedBuff", 1.0, IID_TARGET, 150 if quick else 300,
                 (*slow, "--mode", "async"), needs="--mode")]


def _demo_help() -> str:
    return subprocess.run([sys.executable, "-m", "fedmq.cli", "demo", "--help"],
                          capture_output=True, text=True, check=False).stdout


def run_cell(cell: Cell, seed: int, work: Path) -> Run:
    """One ``fedmq demo`` over Mosquitto; rounds and wall time to target from its JSON."""
    out = work / f"{cell.group}-{cell.partition}-{cell.method}-{cell.fraction}-{seed}.json"
    out = out.with_name(out.name.replace(" ", "_").replace("=", ""))
    cmd = [sys.executable, "-m", "fedmq.cli", "demo", "--broker", "mosquitto", "--devices", "20",
           "--partition", cell.partition, "--seed", str(seed), "--fraction", str(cell.fraction),
           "--rounds", str(cell.cap), "--target", str(cell.target), "--timeout", "900",
           "--json", str(out), *cell.options]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.exists():
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        return Run(seed, None, None, error=f"exit {proc.returncode}: {lines[-1]}")
    rounds = json.loads(out.read_text())["rounds"]
    curve = [float(r["accuracy"]) for r in rounds]
    best = 0.0
    for i, acc in enumerate(curve):
        best = max(best, acc)
        if best >= cell.target:
            return Run(seed, i + 1, float(rounds[i]["elapsed_s"]), curve)
    return Run(seed, None, None, curve)


def median_or_miss(values: list[float | None]) -> float | None:
    """The median, a miss counting as larger than any reached value; None when it is a miss."""
    ordered = sorted(values, key=lambda v: math.inf if v is None else v)
    if not ordered:
        return None
    if len(ordered) % 2:
        return ordered[len(ordered) // 2]
    a, b = ordered[len(ordered) // 2 - 1], ordered[len(ordered) // 2]
    return None if a is None or b is None else (a + b) / 2


@dataclass
class Result:
    """A cell and its runs."""

    cell: Cell
    runs: list[Run]

    @property
    def missing(self) -> str:
        errors = [r.error for r in self.runs if r.error]
        return errors[0] if len(errors) == len(self.runs) else ""

    @property
    def rounds(self) -> float | None:
        return median_or_miss([r.rounds_to_target for r in self.runs if not r.error])

    @property
    def wall(self) -> float | None:
        return median_or_miss([r.wall_to_target for r in self.runs if not r.error])

    def show(self, value: float | None, unit: str = "") -> str:
        if self.missing:
            return "not run"
        if value is None:
            return f">{self.cell.cap} rounds" if unit else f">{self.cell.cap}"
        return f"{value:.1f} s" if unit else f"{value:g}"

    def per_seed(self) -> str:
        return ", ".join("err" if r.error else (str(r.rounds_to_target) if r.rounds_to_target
                                                 else f">{self.cell.cap}") for r in self.runs)

    def as_json(self) -> dict[str, Any]:
        c = self.cell
        return {"group": c.group, "partition": c.partition, "method": c.method,
                "fraction": c.fraction, "target": c.target, "cap": c.cap,
                "options": list(c.options), "median_rounds": self.rounds,
                "median_wall_s": self.wall, "not_run": self.missing or None,
                "runs": [{"seed": r.seed, "rounds_to_target": r.rounds_to_target,
                          "wall_to_target_s": r.wall_to_target, "curve": r.curve,
                          "error": r.error or None} for r in self.runs]}


def run_cells(cells: list[Cell], seeds: list[int], jobs: int, work: Path) -> list[Result]:
    """Every (cell, seed), ``jobs`` demos at a time; cells whose option is missing are skipped."""
    help_text = _demo_help()
    todo = [(c, s) for c in cells for s in seeds]

    def one(cs: tuple[Cell, int]) -> Run:
        c, s = cs
        # Whole option names only: argparse would take "--mode" for a prefix of "--model".
        if c.needs and not re.search(re.escape(c.needs) + r"[\s,=\]]", help_text):
            run = Run(s, None, None, error=f"fedmq demo has no {c.needs} option yet")
        else:
            run = run_cell(c, s, work)
        print(f"  {c.group:8} {c.partition:6} {c.method:13} C={c.fraction:<4} seed {s}: "
              + (run.error or (f"{run.rounds_to_target} rounds, {run.wall_to_target:.1f} s"
                               if run.rounds_to_target else f">{c.cap} rounds (missed)")),
              flush=True)
        return run

    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        runs = list(pool.map(one, todo))
    return [Result(c, runs[i * len(seeds):(i + 1) * len(seeds)]) for i, c in enumerate(cells)]


def _ratio(num: Result | None, den: Result | None, wall: bool = False
           ) -> tuple[float | None, bool]:
    """num / den of the medians, and whether it is only a lower bound (num missed its cap)."""
    if num is None or den is None or num.missing or den.missing:
        return None, False
    a, b = (num.wall, den.wall) if wall else (num.rounds, den.rounds)
    if b is None:
        return None, False
    if a is None:  # the numerator never got there: its cap is a lower bound
        return (None, True) if wall else (round(num.cell.cap / b, 3), True)
    return round(a / b, 3), False


def _find(results: list[Result], group: str, partition: str, method: str,
          fraction: float | None = None) -> Result | None:
    for r in results:
        c = r.cell
        if (c.group, c.partition, c.method) == (group, partition, method) and (
                fraction is None or c.fraction == fraction):
            return r
    return None


def markdown(results: list[Result], rss: dict[str, Any]) -> str:
    """The tables docs/learning.md shows."""
    out = ["Rounds to target (median of seeds; per seed in brackets; central test split):", "",
           "| method | C | IID, 0.95 | label shards, 0.90 |", "|---|---|---|---|"]
    for r in results:
        c = r.cell
        if c.group != "table2" or c.partition != "iid":
            continue
        other = _find(results, "table2", "shards", c.method, c.fraction)
        shards = (f"{other.show(other.rounds)} ({other.per_seed()})" if other else "not run")
        out.append(f"| {c.method} | {c.fraction:g} | {r.show(r.rounds)} ({r.per_seed()}) "
                   f"| {shards} |")
    remedies = [r for r in results if r.cell.group == "remedies"]
    if remedies:
        out += ["", f"Label shards, E=5 B=10 C={remedies[0].cell.fraction:g}, rounds to 0.90:",
                "", "| strategy | median | per seed |", "|---|---|---|"]
        out += [f"| {r.cell.method} | {r.show(r.rounds)} | {r.missing or r.per_seed()} |"
                for r in remedies]
    walls = [r for r in results if r.cell.group == "async"]
    if walls:
        out += ["", "IID, 30% of devices 10x slower, wall time to 0.95:", "",
                "| mode | median wall | median rounds/versions | per seed |", "|---|---|---|---|"]
        out += [f"| {r.cell.method} | {r.show(r.wall, 's')} | {r.show(r.rounds)} "
                f"| {r.missing or r.per_seed()} |" for r in walls]
    if rss:
        out += ["", "Aggregator peak resident memory (VmHWM), 50 vs 500 updates per round:", "",
                "| strategy | 50 | 500 | ratio |", "|---|---|---|---|"]
        for name, v in rss.items():
            if "error" in v:
                out.append(f"| {name} | not run: {v['error']} | | |")
                continue
            lo, hi = v["hwm_kib_small"], v["hwm_kib_large"]
            out.append(f"| {name} | {lo / 1024:.0f} MiB | {hi / 1024:.0f} MiB "
                       f"| {v['ratio']:.3f} |")
    return "\n".join(out) + "\n"


def plot(results: list[Result], path: Path) -> None:
    """Accuracy against round (seed 0's run) for the remedies on label shards and for Table 2's
    C = 0.5 (or the quick run's C = 1) cells on IID; each curve ends where its run stopped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=80)
    panels = (("iid", "table2", IID_TARGET), ("shards", "remedies", SHARDS_TARGET))
    for ax, (partition, group, target) in zip(axes, panels, strict=True):
        cells = [r for r in results if r.cell.group == group and r.cell.partition == partition]
        fractions = {r.cell.fraction for r in cells}
        shown = 0.5 if 0.5 in fractions else max(fractions, default=1.0)
        for r in cells:
            runs = [run for run in r.runs if run.curve]
            if r.cell.fraction != shown or not runs:
                continue
            curve = runs[0].curve
            ax.plot(range(1, len(curve) + 1), curve, label=r.cell.method, linewidth=1.4)
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{partition}, C={shown:g} (seed {cells[0].runs[0].seed if cells else 0})")
        ax.set_xlabel("round (model version)")
        ax.set_ylabel("central test accuracy")
        ax.set_ylim(0.0, 1.0)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def summary(results: list[Result], rss: dict[str, Any], quick: bool) -> dict[str, Any]:
    """The four keys, their inputs, and every cell."""
    c = 1.0 if quick else 0.5
    sgd = _find(results, "table2", "iid", "FedSGD", c)
    avg = _find(results, "table2", "iid", "FedAvg E=5", c)
    fedsgd_ratio, fedsgd_lower = _ratio(sgd, avg)
    remedies = [r for r in results if r.cell.group == "remedies" and r.cell.method != "FedAvg"
                and not r.missing]
    reached = [r for r in remedies if r.rounds is not None]
    best = min(reached, key=lambda r: r.rounds or math.inf) if reached else (
        remedies[0] if remedies else None)
    remedy_ratio, remedy_lower = _ratio(_find(results, "remedies", "shards", "FedAvg"), best)
    wall_ratio, _ = _ratio(_find(results, "async", "iid", "sync FedAvg"),
                           _find(results, "async", "iid", "async FedBuff"), wall=True)
    ratios = {k: v["ratio"] for k, v in rss.items() if "ratio" in v}
    return {
        "rounds_ratio_fedsgd_over_fedavg": fedsgd_ratio,
        "rounds_ratio_fedsgd_over_fedavg_lower_bound": fedsgd_lower,
        "rounds_ratio_fedsgd_over_fedavg_fraction": c,
        "rounds_ratio_fedavg_over_best_remedy": remedy_ratio,
        "rounds_ratio_fedavg_over_best_remedy_lower_bound": remedy_lower,
        "best_remedy": best.cell.method if best else None,
        "wall_ratio_sync_over_async": wall_ratio,
        "rss_ratio_500_over_50_devices": max(ratios.values()) if ratios else None,
        "rss_ratio_500_over_50_devices_per_strategy": ratios,
        "rss": rss,
        "accuracy_curve": "central held-out test split (450 digits), the demo's rounds[].accuracy",
        "quick": quick,
        "cells": [r.as_json() for r in results],
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: one seed, a few C = 1 cells, two strategies' memory")
    p.add_argument("--json", type=Path, default=None, metavar="PATH")
    p.add_argument("--plot", type=Path, default=None, metavar="PATH",
                   help="a PNG of accuracy against round per strategy (needs matplotlib)")
    p.add_argument("--table", type=Path, default=None, metavar="PATH",
                   help="also write the markdown tables here")
    p.add_argument("--jobs", type=int, default=4,
                   help="demos run at once for the rounds-to-target cells (default 4); the "
                        "wall-time cells and the memory runs always run alone")
    p.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 3, quick 1)")
    p.add_argument("--groups", default="table2,remedies,async,rss",
                   help="which parts to run (default all: table2,remedies,async,rss)")
    args = p.parse_args(argv)
    started = time.monotonic()
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    work = Path(tempfile.mkdtemp(prefix="fedmq-learning-"))
    print(f"rounds to target on the central test split; demo JSON under {work}", flush=True)
    groups = set(args.groups.split(","))
    cells = ((table2_cells(args.quick) if "table2" in groups else [])
             + (remedy_cells(args.quick) if "remedies" in groups else []))
    results = run_cells(cells, seeds, args.jobs, work)
    # Wall time is the measurement here: one demo at a time, nothing else on the CPUs.
    if "async" in groups:
        results += run_cells(async_cells(args.quick), seeds, 1, work)
    strategies = ("fedavg", "fedadam") if args.quick else learning_rss.STRATEGIES
    rss = (learning_rss.run(strategies, 50, 500, 2 if args.quick else 3) if "rss" in groups
           else {})
    table = markdown(results, rss)
    print(table)
    out = summary(results, rss, args.quick)
    out["bench_wall_s"] = round(time.monotonic() - started, 1)
    for key in ("rounds_ratio_fedsgd_over_fedavg", "rounds_ratio_fedavg_over_best_remedy",
                "wall_ratio_sync_over_async", "rss_ratio_500_over_50_devices"):
        lower = out.get(f"{key}_lower_bound")
        note = " (a lower bound: the numerator missed its cap)" if lower else ""
        print(f"{key} = {out[key]}{note}")
    print(f"bench wall time {out['bench_wall_s']:.0f} s")
    if args.table:
        args.table.write_text(table)
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
