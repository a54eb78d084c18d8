"""Federated analytics: a device's summary of its values, and the merge of summaries.

A statistics federation (``[task] kind = "statistics"``, docs/analytics.md) asks every device
for a ``Summary`` of each announced column: the count n, the mean, M2 (the sum of squared
deviations from that mean), min, max and a histogram over the bin edges the aggregator
announced, with an underflow and an overflow counter so the counts stay exact. The device
sends it as an ordinary update whose tensors are float64 (codec ``fp64``,
``contribution_tensors``); the aggregator checks it (``read_contribution``: nothing a device
sends raises) and merges summaries with the parallel algorithm of Chan, Golub and LeVeque
(``merge``), one at a time, in O(columns x bins) memory.

Precision. Counts, min, max and histograms are exact (integers below 2**53 in float64). A mean
near 1e9 is known to float64 only to ~1e-7, and the merge's ``delta = mean_b - mean_a`` would
carry that error into M2 at first order; so every mean travels as an unevaluated sum
``mean + mean_lo`` (a double-double: ``mean`` rounded, ``mean_lo`` the rest), both on the wire
and in the aggregator, and the merge computes ``delta`` from both parts. Mean and variance are
then within a few ulps of the exact values whatever the offset of the data (tests/unit/
test_statistics.py checks < 1e-12 relative against exact rational arithmetic and numpy).

Pure numpy: no sockets, threads or clock; devices import it (never numba).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from fedmq.wire import FP64, ColumnStatistics, StatsColumn, Tensor

if TYPE_CHECKING:
    from fedmq.config_schema import TaskConfig

__all__ = [
    "FIELDS",
    "MAX_COUNT",
    "MAX_MAGNITUDE",
    "Summary",
    "column_statistics",
    "contribution_bytes",
    "contribution_tensors",
    "empty",
    "equal_width_edges",
    "from_flat",
    "merge",
    "query_of",
    "read_contribution",
    "summarize",
    "to_flat",
]

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]

#: The tensors of one column's contribution, named ``{column}/{field}``: all scalars but
#: ``hist`` (``[underflow, bin 0, ..., bin n-1, overflow]``). ``mean_lo`` may be left out (0).
FIELDS = ("count", "mean", "mean_lo", "m2", "min", "max", "hist")
#: Most values one contribution may summarize per column (counts stay exact in float64 even
#: summed over 8192 such contributions).
MAX_COUNT = 1 << 40
#: Values beyond ±1e100 cannot be summarized: M2 could overflow float64.
MAX_MAGNITUDE = 1e100
#: Relative slack for checks that compare rounded results (mean within [min, max], M2 bound).
_SLACK = 1e-12


@dataclass(frozen=True, eq=False)
class Summary:
    """One column's statistics over some values: mergeable with ``merge``.

    ``mean + mean_lo`` is the mean (a double-double); with ``count == 0`` every float is 0.
    ``hist`` has the announced bins plus an underflow (first) and an overflow (last) counter.
    ``devices`` counts the merged summaries that had values (1 or 0 for a device's own).
    """

    count: int
    mean: float
    mean_lo: float
    m2: float
    min: float
    max: float
    hist: I64
    devices: int = field(default=0)

    @property
    def total_mean(self) -> float:
        """The mean, rounded once."""
        return self.mean + self.mean_lo


def _two_sum(a: float, b: float) -> tuple[float, float]:
    """``(s, e)`` with ``s = fl(a + b)`` and ``a + b = s + e`` exactly (Knuth's TwoSum)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def equal_width_edges(lo: float, hi: float, nbins: int) -> tuple[float, ...]:
    """``nbins`` equal bins over [lo, hi]: numpy.linspace's edges (as ``np.histogram(x, nbins,
    (lo, hi))`` uses them)."""
    return tuple(float(e) for e in np.linspace(lo, hi, nbins + 1))


def query_of(task: TaskConfig) -> tuple[StatsColumn, ...]:
    """The columns and bin edges ``[task]`` asks for (as announced); ``ValueError`` when the
    bins of a column are too narrow for float64 to tell their edges apart."""
    out = []
    for column in task.columns:
        spec = task.column_bins.get(column)
        if spec is None and task.edges is not None:
            edges = tuple(float(e) for e in task.edges)
        else:
            lo, hi, n = spec if spec is not None else (task.bins or [0.0, 1.0, 1])
            edges = equal_width_edges(float(lo), float(hi), int(n))
            if any(b <= a for a, b in itertools.pairwise(edges)):
                raise ValueError(f"[task] the {int(n)} bins of column {column!r} over "
                                 f"[{lo!r}, {hi!r}] are too narrow for float64: fewer bins")
        out.append(StatsColumn(column, edges))
    return tuple(out)


def empty(nbins: int) -> Summary:
    """The summary of no values (the identity of ``merge``)."""
    return Summary(0, 0.0, 0.0, 0.0, 0.0, 0.0, np.zeros(nbins + 2, dtype=np.int64))


def summarize(values: npt.ArrayLike, edges: Sequence[float]) -> Summary:
    """A device's summary of ``values`` over the bins ``edges`` (a two-pass algorithm).

    Non-finite values (NaN: a missing reading) are not values and are skipped. Raises
    ``ValueError`` for a value beyond ±``MAX_MAGNITUDE`` or more than ``MAX_COUNT`` values.
    """
    e = np.asarray(edges, dtype=np.float64)
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return empty(len(e) - 1)
    if n > MAX_COUNT:
        raise ValueError(f"{n} values: at most {MAX_COUNT} per column and round")
    lo_v, hi_v = float(x.min()), float(x.max())
    if max(-lo_v, hi_v) > MAX_MAGNITUDE:
        raise ValueError(f"a value beyond ±{MAX_MAGNITUDE:g} cannot be summarized")
    mean = float(np.mean(x))
    d = x - mean  # exact or rounded relative to the deviation itself, never to the offset
    mean_lo = float(np.mean(d))
    d -= mean_lo
    m2 = float(np.sum(d * d))
    mean, mean_lo = _two_sum(mean, mean_lo)
    inside = np.histogram(x, bins=e)[0]
    hist = np.empty(len(e) + 1, dtype=np.int64)
    hist[0] = np.count_nonzero(x < e[0])
    hist[1:-1] = inside
    hist[-1] = np.count_nonzero(x > e[-1])
    return Summary(n, mean, mean_lo, m2, lo_v, hi_v, hist, 1)


def merge(a: Summary, b: Summary) -> Summary:
    """The summary of both value sets (Chan et al.): exact counts, min, max and histogram; mean
    and M2 in double-double / float64. Neither input is changed."""
    if len(a.hist) != len(b.hist):
        raise ValueError(f"histograms of {len(a.hist)} and {len(b.hist)} counters")
    if b.count == 0:
        return Summary(a.count, a.mean, a.mean_lo, a.m2, a.min, a.max, a.hist + b.hist,
                       a.devices + b.devices)
    if a.count == 0:
        return Summary(b.count, b.mean, b.mean_lo, b.m2, b.min, b.max, a.hist + b.hist,
                       a.devices + b.devices)
    n = a.count + b.count
    s, err = _two_sum(b.mean, -a.mean)
    delta = s + (err + (b.mean_lo - a.mean_lo))  # mean_b - mean_a from both parts
    share = b.count / n
    mean, lo = _two_sum(a.mean, delta * share)
    mean, lo = _two_sum(mean, lo + a.mean_lo)
    m2 = a.m2 + b.m2 + delta * delta * (a.count * share)  # δ²·n_a·n_b/n
    return Summary(n, mean, lo, m2, min(a.min, b.min), max(a.max, b.max), a.hist + b.hist,
                   a.devices + b.devices)


def column_statistics(name: str, edges: Sequence[float], s: Summary) -> ColumnStatistics:
    """The wire form of a merged summary (``StatisticsResult``'s columns)."""
    n = s.count
    return ColumnStatistics(
        name=name, count=n, mean=s.total_mean if n else None, variance=s.m2 / n if n else None,
        sample_variance=s.m2 / (n - 1) if n > 1 else None, min=s.min if n else None,
        max=s.max if n else None, edges=tuple(float(e) for e in edges),
        hist=tuple(int(h) for h in s.hist[1:-1]), underflow=int(s.hist[0]),
        overflow=int(s.hist[-1]), devices=s.devices)


# ---------------------------------------------------------------- the wire form


def _tensor(name: str, values: npt.ArrayLike, shape: tuple[int, ...]) -> Tensor:
    data = np.asarray(values, dtype="<f8").tobytes()
    return Tensor(name=name, dtype="float64", shape=shape, codec=FP64, data=data)


def contribution_tensors(summaries: Mapping[str, Summary]) -> tuple[Tensor, ...]:
    """A device's contribution as update tensors: ``{column}/{field}`` for each of ``FIELDS``."""
    out: list[Tensor] = []
    for column, s in summaries.items():
        for key, value in (("count", s.count), ("mean", s.mean), ("mean_lo", s.mean_lo),
                           ("m2", s.m2), ("min", s.min), ("max", s.max)):
            out.append(_tensor(f"{column}/{key}", float(value), ()))
        out.append(_tensor(f"{column}/hist", s.hist.astype(np.float64), (len(s.hist),)))
    return tuple(out)


def contribution_bytes(columns: Sequence[StatsColumn]) -> int:
    """About how large a contribution to ``columns`` is on the wire (payload bytes)."""
    return sum(8 * (len(c.edges) + 7) + 60 * len(FIELDS) + 8 * len(c.name) for c in columns) + 200


def read_contribution(tensors: Sequence[Tensor], columns: Sequence[StatsColumn]
                      ) -> tuple[dict[str, Summary] | None, str, str]:
    """``(summaries, "", "")`` for a valid contribution to ``columns``, else ``(None, reason,
    detail)`` with the rejection reason: ``wrong_shape`` (tensors other than the query's),
    ``non_finite`` (NaN or ±inf) or ``invalid_statistics`` (values that no set of values has,
    e.g. a negative count, a histogram not adding up to the count, a mean outside [min, max]).
    Never raises."""
    by_name = {t.name: t for t in tensors}
    if len(by_name) != len(tensors):
        return None, "wrong_shape", "tensor names are not unique"
    expected: dict[str, tuple[int, ...]] = {}
    for c in columns:
        for key in FIELDS:
            expected[f"{c.name}/{key}"] = (len(c.edges) + 1,) if key == "hist" else ()
    for t in tensors:
        shape = expected.get(t.name)
        if shape is None:
            return None, "wrong_shape", f"unexpected tensor {t.name!r}"
        if t.dtype != "float64" or t.codec != FP64:
            return None, "wrong_shape", f"tensor {t.name!r} must be float64 with codec {FP64}"
        if tuple(t.shape) != shape or t.offset != 0 or t.span != math.prod(shape):
            return None, "wrong_shape", f"tensor {t.name!r} must have shape {list(shape)}"
    missing = [n for n in expected if n not in by_name and not n.endswith("/mean_lo")]
    if missing:
        return None, "wrong_shape", f"missing tensor {missing[0]!r}"
    out: dict[str, Summary] = {}
    for c in columns:
        raw = {key: np.frombuffer(by_name[f"{c.name}/{key}"].data, dtype="<f8")
               for key in FIELDS if f"{c.name}/{key}" in by_name}
        if not all(np.isfinite(v).all() for v in raw.values()):
            return None, "non_finite", f"column {c.name!r}: NaN or inf"
        problem, summary = _check(raw, c.edges)
        if summary is None:
            return None, "invalid_statistics", f"column {c.name!r}: {problem}"
        out[c.name] = summary
    return out, "", ""


def _whole(v: F64, hi: float) -> bool:
    return bool(((v >= 0) & (v <= hi) & (np.floor(v) == v)).all())


def _bin_index(x: float, edges: Sequence[float]) -> int:
    """The histogram counter of ``x``: 0 below the edges, bins 1..n, n+1 above."""
    if x < edges[0]:
        return 0
    if x > edges[-1]:
        return len(edges)
    return min(int(np.searchsorted(edges, x, side="right")), len(edges) - 1)


def _check(raw: Mapping[str, F64], edges: Sequence[float]) -> tuple[str, Summary | None]:
    """One column's values, checked against what a real set of values can give."""
    count_f = float(raw["count"][0])
    mean, m2 = float(raw["mean"][0]), float(raw["m2"][0])
    lo_part = float(raw["mean_lo"][0]) if "mean_lo" in raw else 0.0
    vmin, vmax = float(raw["min"][0]), float(raw["max"][0])
    hist_f = raw["hist"]
    if not _whole(raw["count"], MAX_COUNT):
        return f"count {count_f!r} is not an integer in [0, 2**40]", None
    count = int(count_f)
    if not _whole(hist_f, count_f):
        return "histogram counts must be integers in [0, count]", None
    hist = hist_f.astype(np.int64)
    if int(hist.sum()) != count:
        return f"histogram counts add up to {int(hist.sum())}, not the count {count}", None
    if count == 0:
        if any((mean, lo_part, m2, vmin, vmax)):
            return "no values, yet mean, mean_lo, m2, min or max is not 0", None
        return "", Summary(0, 0.0, 0.0, 0.0, 0.0, 0.0, hist, 0)
    if not (-MAX_MAGNITUDE <= vmin <= vmax <= MAX_MAGNITUDE):
        return f"min {vmin!r} and max {vmax!r} must satisfy -1e100 <= min <= max <= 1e100", None
    if count == 1 and vmin != vmax:
        return "one value, yet min != max", None
    nonzero = np.flatnonzero(hist)
    if nonzero[0] != _bin_index(vmin, edges) or nonzero[-1] != _bin_index(vmax, edges):
        return "the histogram's first and last non-empty bins are not those of min and max", None
    scale = max(abs(vmin), abs(vmax))
    tol = _SLACK * scale
    total = mean + lo_part
    if abs(lo_part) > scale + tol or not (vmin - tol <= total <= vmax + tol):
        return f"mean {total!r} is outside [min, max] = [{vmin!r}, {vmax!r}]", None
    # Popoviciu: a variance is at most (max - min)² / 4.
    if m2 < 0 or m2 > count * ((vmax - vmin) ** 2 / 4 * (1 + _SLACK) + tol * tol):
        return f"m2 {m2!r} is negative or above count * (max - min)² / 4", None
    return "", Summary(count, mean, lo_part, m2, vmin, vmax, hist, 1)


# ---------------------------------------------------------------- snapshots


def _width(c: StatsColumn) -> int:
    return 7 + len(c.edges) + 1


def to_flat(summaries: Sequence[Summary]) -> F64:
    """The merged state as one float64 vector (exact: counts are below 2**53), for snapshots."""
    parts = [np.concatenate(([s.count, s.mean, s.mean_lo, s.m2, s.min, s.max, s.devices],
                             s.hist.astype(np.float64))) for s in summaries]
    return np.concatenate(parts) if parts else np.zeros(0)


def from_flat(flat: F64, columns: Sequence[StatsColumn]) -> list[Summary]:
    """What ``to_flat`` gave, back; ``ValueError`` when it does not fit ``columns``."""
    if flat.shape != (sum(_width(c) for c in columns),):
        raise ValueError(f"saved statistics have {flat.size} values; the query needs "
                         f"{sum(_width(c) for c in columns)}")
    out, at = [], 0
    for c in columns:
        v = flat[at:at + _width(c)]
        at += _width(c)
        out.append(Summary(int(v[0]), float(v[1]), float(v[2]), float(v[3]), float(v[4]),
                           float(v[5]), v[7:].astype(np.int64), int(v[6])))
    return out
