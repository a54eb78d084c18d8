"""Fuzz: hostile statistics contributions on update topics, and hostile statistics queries in
round announcements (issue 11, acceptance 6).

An aggregator of a statistics federation on a ``MemoryTransport`` (driven with ``step()`` and a
clock that never reaches the deadline) gets thousands of contributions built from valid device
summaries by one targeted corruption each (seeded ``random.Random``; every one is invalid by
construction): each must be counted as exactly one rejection with the expected reason, and
nothing may be folded. Byte-level mutants of valid payloads must never raise and count once,
whatever their verdict. Then valid contributions from many devices close the round, whose
retained result must equal numpy on the union of their values. Last, announcements whose
``task`` or ``columns`` are hostile must fail to decode with ``DecodeError`` and be counted by
the device agent as ``malformed``, never acted on.

Run with ``-s`` for the per-reason counts.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import msgpack
import numpy as np
import numpy.typing as npt
import pytest

from aggregator.service import REJECT_REASONS, AggregatorService
from device_agent.service import AgentService
from device_agent.statistics import NoTraining
from fedmq import codec
from fedmq.config import AggregatorConfig, RoundsConfig, TaskConfig
from fedmq.errors import DecodeError
from fedmq.memory_transport import MemoryTransport
from fedmq.statistics import FIELDS, contribution_tensors, equal_width_edges, summarize
from fedmq.topics import Topics
from fedmq.transport import Message
from fedmq.wire import (
    FP64,
    ModelUpdate,
    RoundAnnouncement,
    StatisticsResult,
    StatsColumn,
    Tensor,
)

FED = "fuzzstats"
TOPICS = Topics(FED)
T0 = 1_000_000.0
HOSTILE_CASES = 4000
MUTANTS = 1500
VALID = 40
F64 = npt.NDArray[np.float64]
QUERY = {"temp": [-10.0, 40.0, 25], "load": [0.0, 1.0, 4]}
EDGES = {k: equal_width_edges(lo, hi, int(n)) for k, (lo, hi, n) in QUERY.items()}


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def service(max_updates: int) -> AggregatorService:
    config = AggregatorConfig(
        federation=FED,
        rounds=RoundsConfig(min_updates=1, max_updates=max_updates, deadline_s=1e6),
        task=TaskConfig(kind="statistics", columns=list(QUERY),
                        column_bins={k: list(v) for k, v in QUERY.items()}))
    agg = AggregatorService(config, MemoryTransport(), clock=Clock())
    agg.start(connect_timeout=0.0)
    agg.stop()
    assert (agg.round, agg.version) == (1, 0)
    return agg


def values_of(rng: random.Random) -> dict[str, F64]:
    g = np.random.default_rng(rng.randrange(2**32))
    n = rng.choice([0, 1, 2, 5, 100])
    return {"temp": g.normal(20, 15, n), "load": g.uniform(-0.2, 1.2, rng.choice([0, 1, 30]))}


def fields_of(values: dict[str, F64]) -> dict[str, F64]:
    """``{column/field: float64 array}`` of a valid contribution."""
    tensors = contribution_tensors({c: summarize(values[c], EDGES[c]) for c in QUERY})
    return {t.name: np.frombuffer(t.data, "<f8").copy() for t in tensors}


def tensor(name: str, v: F64, *, dtype: str = "float64", codec_: str = FP64,
           shape: tuple[int, ...] | None = None) -> Tensor:
    data = np.asarray(v, "<f8" if dtype == "float64" else "<f4").tobytes()
    return Tensor(name=name, dtype=dtype, shape=shape if shape is not None else
                  (() if v.size == 1 and not name.endswith("/hist") else (v.size,)),
                  codec=codec_, data=data)


def update(device: str, tensors: list[Tensor], **kw: object) -> bytes:
    fields: dict[str, object] = {"federation": FED, "device_id": device, "round": 1,
                                 "base_version": 0, "update_id": f"u-{device}",
                                 "num_examples": 1, "tensors": tuple(tensors)} | kw
    return codec.encode(ModelUpdate(**fields))  # type: ignore[arg-type]


Outcome = tuple[list[Tensor] | None, str, dict[str, object]]
Corruption = Callable[[dict[str, F64], random.Random], Outcome]


def _pick(f: dict[str, F64], rng: random.Random, suffix: str = "") -> str:
    return rng.choice([k for k in f if k.endswith(suffix)] if suffix else sorted(f))


def _plain(f: dict[str, F64]) -> list[Tensor]:
    return [tensor(k, v) for k, v in f.items()]


def _set(f: dict[str, F64], key: str, value: float | F64) -> list[Tensor]:
    g = dict(f)
    g[key] = np.atleast_1d(np.asarray(value, dtype=np.float64))
    return _plain(g)


def _poke(f: dict[str, F64], key: str, value: float, rng: random.Random) -> list[Tensor]:
    """``f`` with one element of ``key`` (a scalar or a histogram counter) set to ``value``."""
    v = f[key].copy()
    v[rng.randrange(v.size)] = value
    return _set(f, key, v)


def _without(f: dict[str, F64], rng: random.Random) -> list[Tensor]:
    """``f`` without one of its tensors (``mean_lo`` may be left out: not that one)."""
    gone = rng.choice([k for k in f if not k.endswith("/mean_lo")])
    return [tensor(n, v) for n, v in f.items() if n != gone]


def _twice(f: dict[str, F64], rng: random.Random) -> list[Tensor]:
    """``f`` with one of its tensors sent twice."""
    k = _pick(f, rng)
    return [*_plain(f), tensor(k, f[k])]


def _one(f: dict[str, F64], key: str, make: Callable[[str, F64], Tensor]) -> list[Tensor]:
    """``f`` as tensors, ``key``'s made by ``make``."""
    return [make(k, v) if k == key else tensor(k, v) for k, v in f.items()]


def _off_by_one(f: dict[str, F64], rng: random.Random) -> list[Tensor]:
    c = rng.choice(list(QUERY))
    n = f[f"{c}/count"][0]
    return _set(f, f"{c}/count", n + rng.choice([1, -1]) if n else 1)


def _negative_bin(f: dict[str, F64], rng: random.Random) -> list[Tensor]:
    c = rng.choice(list(QUERY))
    return _set(f, f"{c}/hist", np.concatenate([[-1.0], f[f"{c}/hist"][1:]]))


def _with_values(f: dict[str, F64]) -> str | None:
    """A column of ``f`` with at least two values (None if none has)."""
    cols = [c for c in QUERY if f[f"{c}/count"][0] >= 2]
    return cols[0] if cols else None


CORRUPTIONS: dict[str, Corruption] = {
    "non_finite": lambda f, r: (_poke(f, _pick(f, r), r.choice([np.nan, np.inf, -np.inf]), r),
                                "non_finite", {}),
    "negative_count": lambda f, r: (_set(f, f"{r.choice(list(QUERY))}/count", -1.0),
                                    "invalid_statistics", {}),
    "fractional_count": lambda f, r: (_set(f, f"{r.choice(list(QUERY))}/count", 2.5),
                                      "invalid_statistics", {}),
    "huge_count": lambda f, r: (_set(f, f"{r.choice(list(QUERY))}/count", 2.0**41),
                                "invalid_statistics", {}),
    "count_off_by_one": lambda f, r: (_off_by_one(f, r), "invalid_statistics", {}),
    "negative_bin": lambda f, r: (_negative_bin(f, r), "invalid_statistics", {}),
    "fp64_as_float32": lambda f, r: (
        _one(f, _pick(f, r), lambda k, v: tensor(k, v, dtype="float32")), "malformed", {}),
    "float64_as_fp32": lambda f, r: (
        _one(f, _pick(f, r), lambda k, v: tensor(k, v, codec_="fp32")), "malformed", {}),
    "wrong_shape": lambda f, r: (
        _one(f, _pick(f, r), lambda k, v: tensor(k, v, shape=(1, v.size))), "wrong_shape", {}),
    "short_hist": lambda f, r: (
        _one(f, _pick(f, r, "/hist"), lambda k, v: tensor(k, v[:-1])), "wrong_shape", {}),
    "unknown_tensor": lambda f, r: (
        _one(f, _pick(f, r, "/count"), lambda k, v: tensor("extra/count", v)),
        "wrong_shape", {}),
    "extra_tensor": lambda f, r: ([*_plain(f), tensor("extra/count", np.zeros(1))],
                                  "oversize", {}),  # more tensors than the query has
    "missing_tensor": lambda f, r: (_without(f, r), "wrong_shape", {}),
    "duplicate_tensor": lambda f, r: (_twice(f, r), "oversize", {}),
    "chunked": lambda f, r: (_plain(f), "malformed", {"chunk": 0, "chunks": 2}),
    "no_weight": lambda f, r: (_plain(f), "invalid_weight", {"num_examples": 0}),
    "negative_weight": lambda f, r: (_plain(f), "malformed", {"num_examples": -1}),
}


def _needs_values(kind: str) -> Corruption:
    """Corruptions that only mean something for a column with two values or more."""
    def make(f: dict[str, F64], r: random.Random) -> Outcome:
        c = _with_values(f)
        if c is None:
            return None, "", {}
        lo, hi, m2 = f[f"{c}/min"][0], f[f"{c}/max"][0], f[f"{c}/m2"][0]
        n = f[f"{c}/count"][0]
        if kind == "min_above_max":
            g = _set(f, f"{c}/min", hi + 1.0)
        elif kind == "mean_outside":
            g = _set(f, f"{c}/mean", r.choice([lo - 1.0 - abs(lo), hi + 1.0 + abs(hi)]))
        elif kind == "negative_m2":
            g = _set(f, f"{c}/m2", -1e-3 - m2)
        elif kind == "m2_too_large":
            g = _set(f, f"{c}/m2", n * (hi - lo) ** 2 / 4 * 1.01 + 1e-9)
        else:  # "hist_moved": min's values moved a bin down (or max's up): min's bin is empty
            h = f[f"{c}/hist"].copy()
            nz = np.flatnonzero(h)
            if nz[0] > 0:
                h[nz[0] - 1], h[nz[0]] = h[nz[0]], 0
            elif nz[-1] < len(h) - 1:
                h[nz[-1] + 1], h[nz[-1]] = h[nz[-1]], 0
            else:
                return None, "", {}
            g = _set(f, f"{c}/hist", h)
        return g, "invalid_statistics", {}
    return make


for _kind in ("min_above_max", "mean_outside", "negative_m2", "m2_too_large", "hist_moved"):
    CORRUPTIONS[_kind] = _needs_values(_kind)


def send(agg: AggregatorService, device: str, payload: bytes) -> str:
    """Step one payload; return the one reason counted ("" if accepted)."""
    before, accepted = Counter(agg.stats.rejected), agg.stats.accepted
    agg.step(Message(TOPICS.update(device), payload, qos=1))
    counted = agg.stats.rejected - before
    if agg.stats.accepted == accepted + 1:
        assert not counted
        return ""
    assert agg.stats.accepted == accepted
    assert sum(counted.values()) == 1, dict(counted)
    (reason,) = counted
    assert reason in REJECT_REASONS
    return reason


def test_hostile_contributions_are_rejected_and_valid_ones_merge_exactly() -> None:
    rng = random.Random(1101)
    agg = service(max_updates=VALID)
    by_reason: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    sent = 0
    while sent < HOSTILE_CASES:
        kind = rng.choice(sorted(CORRUPTIONS))
        tensors, reason, extra = CORRUPTIONS[kind](fields_of(values_of(rng)), rng)
        if tensors is None:
            continue
        device = f"h{sent}"
        try:
            payload = update(device, tensors, **extra)
        except (TypeError, ValueError):  # the encoder refused: fine, nothing reaches the wire
            continue
        got = send(agg, device, payload)
        assert got == reason, (kind, got, reason)
        by_reason[got] += 1
        by_kind[kind] += 1
        sent += 1
    assert set(by_kind) == set(CORRUPTIONS), set(CORRUPTIONS) - set(by_kind)
    assert agg.stats.accepted == 0
    assert agg.strategy.contributors == 0

    # Byte mutants: never raise; one verdict each.
    mutants: Counter[str] = Counter()
    for i in range(MUTANTS):
        device = f"m{i}"
        raw = bytearray(update(device, _plain(fields_of(values_of(rng)))))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(raw))
            op = rng.choice(["flip", "cut", "insert", "delete"])
            if op == "flip":
                raw[at] ^= 1 << rng.randrange(8)
            elif op == "cut":
                del raw[at:]
            elif op == "insert":
                raw.insert(at, rng.randrange(256))
            elif len(raw) > 1:
                del raw[at]
            if not raw:
                raw = bytearray(b"\x00")
        mutants[send(agg, device, bytes(raw)) or "accepted"] += 1
    print(f"\ntargeted: {dict(by_reason)}\nbyte mutants: {dict(mutants)}")
    check_valid_contributions(rng)


def check_valid_contributions(rng: random.Random) -> None:
    """Valid contributions from many devices close a round whose result equals numpy."""
    agg2 = service(max_updates=VALID)
    pool: list[dict[str, F64]] = []
    for i in range(VALID):
        v = values_of(rng)
        if i == 0:
            v = {"temp": 1e9 + np.arange(5.0), "load": np.zeros(0)}  # far outside the bins
        pool.append(v)
        assert send(agg2, f"good-{i:02d}", update(f"good-{i:02d}", _plain(fields_of(v)))) == ""
    results = [codec.decode(m.payload) for m in agg2.transport.published  # type: ignore[attr-defined]
               if m.topic == TOPICS.result]
    assert len(results) == 1
    result = results[0]
    assert isinstance(result, StatisticsResult)
    assert result.devices == tuple(f"good-{i:02d}" for i in range(VALID))
    for col in result.columns:
        x = np.concatenate([p[col.name] for p in pool])
        assert col.count == x.size
        assert col.min == x.min()
        assert col.max == x.max()
        assert col.hist == tuple(int(h) for h in np.histogram(x, EDGES[col.name])[0])
        assert col.underflow + sum(col.hist) + col.overflow == x.size
        assert col.mean is not None
        assert col.variance is not None
        assert abs(col.mean - np.mean(x)) <= 1e-12 * abs(np.mean(x))
        assert abs(col.variance - np.var(x)) <= 1e-12 * np.var(x)


# ---------------------------------------------------------------- announcements


def _announcement() -> dict[str, object]:
    ann = RoundAnnouncement(
        federation=FED, round=3, base_version=2, model_sha256="0" * 64, deadline=T0 + 60,
        min_updates=1, max_updates=5, task="statistics",
        columns=tuple(StatsColumn(k, e) for k, e in EDGES.items()))
    doc: dict[str, object] = msgpack.unpackb(codec.encode(ann), raw=False)
    return doc


def _hostile_queries(rng: random.Random) -> list[tuple[str, object, object]]:
    """(what, key, value) for ``task`` and ``columns``; each must not decode."""
    edges = list(EDGES["temp"])
    col = {"name": "temp", "edges": edges}
    out: list[tuple[str, object, object]] = [
        ("unknown task", "task", "median"), ("task not a string", "task", 3),
        ("columns not a list", "columns", {"temp": edges}),
        ("column not a map", "columns", [["temp", edges]]),
        ("no name", "columns", [{"edges": edges}]), ("no edges", "columns", [{"name": "t"}]),
        ("name not a string", "columns", [{"name": 5, "edges": edges}]),
        ("duplicate names", "columns", [col, col]),
        ("one edge", "columns", [{"name": "t", "edges": [1.0]}]),
        ("edges not increasing", "columns", [{"name": "t", "edges": [0.0, 2.0, 1.0]}]),
        ("equal edges", "columns", [{"name": "t", "edges": [0.0, 1.0, 1.0]}]),
        ("NaN edge", "columns", [{"name": "t", "edges": [0.0, float("nan")]}]),
        ("inf edge", "columns", [{"name": "t", "edges": [0.0, float("inf")]}]),
        ("string edge", "columns", [{"name": "t", "edges": [0.0, "1"]}]),
        ("bool edge", "columns", [{"name": "t", "edges": [False, True]}]),
        ("too many bins", "columns", [{"name": "t", "edges": list(range(codec.MAX_BINS + 2))}]),
        ("too many columns", "columns",
         [{"name": f"c{i}", "edges": [0.0, 1.0]} for i in range(codec.MAX_COLUMNS + 1)]),
    ]
    for _ in range(300):  # random edge lists with at least one step that does not go up
        n = rng.randint(2, 40)
        e = sorted(rng.uniform(-1e6, 1e6) for _ in range(n))
        i = rng.randrange(1, n)
        e[i] = e[i - 1] - rng.choice([0.0, rng.uniform(0, 10)])
        out.append(("random non-increasing edges", "columns", [{"name": "t", "edges": e}]))
    return out


def test_hostile_queries_do_not_decode_and_devices_count_them() -> None:
    agent = AgentService(FED, "dev-1", NoTraining(), MemoryTransport())
    valid = msgpack.packb(_announcement(), use_bin_type=True)
    decoded = codec.decode(valid)
    assert isinstance(decoded, RoundAnnouncement)
    assert decoded.task == "statistics"
    cases = _hostile_queries(random.Random(7))
    for what, key, value in cases:
        doc = _announcement() | {key: value}
        payload = msgpack.packb(doc, use_bin_type=True)
        with pytest.raises(DecodeError):
            codec.decode(payload)
        before = agent.ignored["malformed"]
        agent.handle_message(Message(TOPICS.round, payload, qos=1))
        assert agent.ignored["malformed"] == before + 1, what
        assert agent.machine.announcement is None, what  # never acted on
    agent.handle_message(Message(TOPICS.round, valid, qos=1))
    assert agent.machine.announcement is not None
    assert agent.ignored["malformed"] == len(cases)
    print(f"\n{len(cases)} hostile queries counted as malformed")


def test_every_field_is_part_of_the_contribution() -> None:
    assert {t.name.split("/")[1] for t in contribution_tensors(
        {"temp": summarize(np.array([1.0]), EDGES["temp"])})} == set(FIELDS)
