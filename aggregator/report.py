"""``fedmq report --history DIR --out report.png``: a federation's model history as a picture.

Reads the aggregator's model history (``[durability] state_dir/models``, see
``aggregator.history``) and draws, per model version, four panels into one PNG: accuracy and loss
(the devices' federated evaluation, ``eval_*``, and the mean over the round's updates,
``train_*``, each labelled), the round's participants and the bytes of updates it received. A
panel whose metric no version carries says "no data". matplotlib is the optional ``plot`` extra,
imported only when drawing, with the Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aggregator.history import HistoryError, ModelHistory

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["Point", "add_arguments", "collect", "draw", "history_dir", "run"]

EXTRA_MISSING = "fedmq report needs the plot extra: pip install 'fedmq[plot]'"


@dataclass(frozen=True)
class Point:
    """One model version and its metrics as stored in the history."""

    version: int
    round: int
    metrics: dict[str, float] = field(default_factory=dict)


def history_dir(path: Path) -> Path:
    """``path`` if it holds model versions, else its ``models`` subdirectory when that does
    (so the aggregator's ``state_dir`` works too)."""
    if not ModelHistory(path, keep=1).versions() and ModelHistory(path / "models",
                                                                  keep=1).versions():
        return path / "models"
    return path


def collect(directory: Path) -> tuple[str, list[Point], list[str]]:
    """(federation, one point per readable version oldest first, one line per damaged one)."""
    history = ModelHistory(directory, keep=1)  # keep only matters to save
    federation, points, damaged = "", [], []
    for v in history.versions():
        try:
            model = history.load(v)
        except HistoryError as exc:
            damaged.append(f"skipping version {v}: {exc}")
            continue
        federation = model.federation
        points.append(Point(v, model.round, {k: float(x) for k, x in model.metrics.items()
                                             if math.isfinite(x)}))
    return federation, points, damaged


def _series(points: Sequence[Point], key: str) -> tuple[list[int], list[float]]:
    pairs = [(p.version, p.metrics[key]) for p in points if key in p.metrics]
    return [v for v, _ in pairs], [x for _, x in pairs]


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no data\n({what})", ha="center", va="center", color="grey",
            transform=ax.transAxes)


def _lines(ax: Axes, points: Sequence[Point], name: str, *, percent: bool) -> None:
    """``eval_<name>`` and ``train_<name>`` per version, each labelled with its source."""
    drawn = False
    for key, label, style in ((f"eval_{name}", "eval (devices' held-out data)", "o-"),
                              (f"train_{name}", "train (mean over the round's updates)",
                               "s--")):
        xs, ys = _series(points, key)
        if xs:
            ax.plot(xs, [y * 100 for y in ys] if percent else ys, style, label=label,
                    markersize=4)
            drawn = True
    if drawn:
        ax.legend(loc="best", fontsize="small")
    else:
        _no_data(ax, f"no version carries eval_{name} or train_{name}")


def _bars(ax: Axes, points: Sequence[Point], key: str, *, scale: float = 1.0,
          color: str) -> None:
    xs, ys = _series(points, key)
    if xs:
        ax.bar(xs, [y / scale for y in ys], color=color, width=0.8)
    else:
        _no_data(ax, f"no version carries {key}")


def draw(federation: str, points: Sequence[Point], out: Path) -> None:
    """Write the four panels for ``points`` to ``out`` (PNG, 1200x800 pixels)."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: no display, no GUI toolkit
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), dpi=100, sharex=True)
    acc, loss, parts, size = axes[0][0], axes[0][1], axes[1][0], axes[1][1]
    _lines(acc, points, "accuracy", percent=True)
    acc.set_title("Accuracy")
    acc.set_ylabel("%")
    _lines(loss, points, "loss", percent=False)
    loss.set_title("Loss")
    _bars(parts, points, "participants", color="tab:blue")
    parts.set_title("Participants (updates folded)")
    parts.set_ylabel("updates")
    top = max(_series(points, "bytes_in")[1], default=0.0)
    unit, scale = next(((u, s) for u, s in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3))
                        if top >= s), ("bytes", 1.0))
    _bars(size, points, "bytes_in", scale=scale, color="tab:orange")
    size.set_title("Bytes of updates received")
    size.set_ylabel(unit)
    for ax in (acc, loss, parts, size):
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    parts.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (parts, size):
        ax.set_xlabel("model version")
    first, last = points[0].version, points[-1].version
    fig.suptitle(f"fedmq federation {federation or '?'}: model versions {first} to {last}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``fedmq report``."""
    p.add_argument("--history", required=True, metavar="DIR",
                   help="the aggregator's model history: [durability] state_dir/models (or "
                        "state_dir itself)")
    p.add_argument("--out", default="report.png", help="the PNG to write (default "
                                                       "%(default)s)")


def run(args: argparse.Namespace) -> int:
    """Exit 0 once written; 2 without matplotlib, without versions, or if it cannot write."""
    try:
        import matplotlib  # noqa: F401  (only to tell a missing extra in one line)
    except ImportError:
        print(EXTRA_MISSING, file=sys.stderr)
        return 2
    directory = history_dir(Path(args.history))
    federation, points, damaged = collect(directory)
    for line in damaged:
        print(f"fedmq report: {line}", file=sys.stderr)
    if not points:
        what = "does not exist" if not directory.exists() else "holds no model versions"
        print(f"fedmq report: {directory} {what}: give the aggregator's history directory "
              "([durability] state_dir/models)", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        draw(federation, points, out)
    except OSError as exc:
        print(f"fedmq report: cannot write {out}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(points)} versions)")
    return 0
