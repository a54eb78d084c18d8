"""The statistics task on the wire (federated analytics): an announcement's ``task`` and
``columns``, and the ``result`` message with each column's statistics."""

from __future__ import annotations

import itertools
import math
from typing import Any

from fedmq.codec_fields import DecodeLimits, Fields, is_int, is_number
from fedmq.errors import DecodeError
from fedmq.wire import ColumnStatistics, RoundAnnouncement, StatisticsResult, StatsColumn

__all__ = ["MAX_BINS", "MAX_COLUMNS", "TASKS", "column_map", "query", "result", "task",
           "task_map"]


#: Tasks an announcement may name (``RoundAnnouncement.task``).
TASKS = ("train", "statistics")
#: Most columns in a statistics query, and bins per column.
MAX_COLUMNS = 256
MAX_BINS = 1 << 16


def task(f: Fields) -> str:
    task = f.optional("task", f.str_, "train")
    if task not in TASKS:  # a device must not compute what it does not know
        raise DecodeError(f"round: task {task!r} is not one of {', '.join(TASKS)}")
    return task


def _edges(raw: Any, where: str) -> tuple[float, ...]:
    """Histogram bin edges: 2 to MAX_BINS + 1 finite numbers, strictly increasing."""
    if not isinstance(raw, list) or not 2 <= len(raw) <= MAX_BINS + 1 \
            or not all(is_number(e) for e in raw):
        raise DecodeError(f"{where}: edges must be 2 to {MAX_BINS + 1} numbers")
    edges = tuple(float(e) for e in raw)
    if not all(math.isfinite(e) for e in edges) or any(
            b <= a for a, b in itertools.pairwise(edges)):
        raise DecodeError(f"{where}: edges must be finite and strictly increasing")
    return edges


def query(f: Fields) -> tuple[StatsColumn, ...]:
    """The announcement's statistics ``columns``: unique names, each with its bin edges."""
    raw: list[Any] = f.optional("columns", f.list_, [])
    if len(raw) > MAX_COLUMNS:
        raise DecodeError(f"round: more than {MAX_COLUMNS} columns")
    columns = []
    for i, c in enumerate(raw):
        if not isinstance(c, dict):
            raise DecodeError(f"round: column {i} must be a map")
        cf = Fields(c, f"round: column {i}", f.limits)
        columns.append(StatsColumn(name=cf.str_("name"),
                                   edges=_edges(cf.list_("edges"), cf.where)))
    if len({c.name for c in columns}) != len(columns):
        raise DecodeError("round: column names are not unique")
    return tuple(columns)


def task_map(msg: RoundAnnouncement) -> dict[str, Any]:
    """A statistics announcement's ``task`` and ``columns`` (absent in a training one)."""
    return {"task": msg.task, "columns": [{"name": c.name, "edges": [float(e) for e in c.edges]}
                                          for c in msg.columns]}


def column_map(c: ColumnStatistics) -> dict[str, Any]:
    m: dict[str, Any] = {"name": c.name, "count": c.count}
    # Undefined without values (sample variance: without two): absent, never NaN.
    for key in ("mean", "variance", "sample_variance", "min", "max"):
        value = getattr(c, key)
        if value is not None:
            m[key] = float(value)
    return m | {"edges": [float(e) for e in c.edges], "hist": list(c.hist),
                "underflow": c.underflow, "overflow": c.overflow, "devices": c.devices}


def _opt_float(f: Fields, key: str) -> float | None:
    return f.optional(key, f.float_, None)


def _column(raw: Any, i: int, limits: DecodeLimits) -> ColumnStatistics:
    if not isinstance(raw, dict):
        raise DecodeError(f"result: column {i} must be a map")
    f = Fields(raw, f"result: column {i}", limits)
    edges = _edges(f.list_("edges"), f.where)
    hist = f.list_("hist")
    if len(hist) != len(edges) - 1 or not all(is_int(h) and h >= 0 for h in hist):
        raise DecodeError(f"{f.where}: hist must be {len(edges) - 1} non-negative integers")
    return ColumnStatistics(
        name=f.str_("name"), count=f.int_("count"), mean=_opt_float(f, "mean"),
        variance=_opt_float(f, "variance"), sample_variance=_opt_float(f, "sample_variance"),
        min=_opt_float(f, "min"), max=_opt_float(f, "max"), edges=edges, hist=tuple(hist),
        underflow=f.optional("underflow", f.int_, 0), overflow=f.optional("overflow", f.int_, 0),
        devices=f.optional("devices", f.int_, 0))


def result(f: Fields, fed: str, run: int) -> StatisticsResult:
    devices = f.list_("devices")
    if not all(isinstance(d, str) for d in devices):
        raise DecodeError("result: devices must be strings")
    columns = f.list_("columns")
    if len(columns) > MAX_COLUMNS:
        raise DecodeError(f"result: more than {MAX_COLUMNS} columns")
    return StatisticsResult(
        federation=fed, round=f.int_("round"), version=f.int_("version"),
        devices=tuple(devices),
        columns=tuple(_column(c, i, f.limits) for i, c in enumerate(columns)),
        closed_by=f.optional("closed_by", f.str_, ""), run=run,
        ts=f.optional("ts", f.float_, 0.0))
