"""Scale-out on the wire: what aggregator workers and their coordinator say to each other
(docs/protocol.md, section 9; docs/scaling.md).

Five messages, msgpack maps like every other fedmq message (``v``, ``kind``, ``fed``):

``WorkerProgress`` (``wprogress/{worker}``, QoS 1)
    A worker's open round: the updates it accepted *and made durable* since its last report
    (``first`` is the index of the first one in the round's list, in the worker's order), and
    whether it has been collected. Sent when it changes (rate-limited) and as a heartbeat; the
    first report of a round, or of a worker process, starts at 0.
``ResendRequest`` (``wresend/{worker}``, QoS 1)
    The coordinator missed reports (it restarted): the worker's next report starts at ``first``.
``CollectRequest`` (``collect``, QoS 1, retained)
    The coordinator closes round ``round``: each worker stops accepting updates for it and
    sends its partial. Retained, so a worker that restarts in between still answers.
``WorkerPartial`` (``partial/{worker}``, QoS 1)
    The worker's share of the round: ``Σ w·x`` in float64 (little-endian, flat over the model's
    parameters in spec order), ``Σ w``, and the ``(device, update_id)`` pairs it holds.
``NormEstimate`` (``estimate``, QoS 1, retained)
    The adaptive norm bound's estimate for a round, which only the coordinator computes (from
    the norms in the progress reports); workers clip with it and hold updates until it is known.

Pure: no sockets, threads or clocks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from fedmq.codec_fields import DEFAULT_LIMITS, DecodeLimits, Fields
from fedmq.errors import DecodeError
from fedmq.msgpack_views import unpack
from fedmq.wire import SCHEMA_VERSION

__all__ = [
    "ClusterMessage",
    "CollectRequest",
    "NormEstimate",
    "ResendRequest",
    "WorkerPartial",
    "WorkerProgress",
    "decode",
    "encode",
]

Pair = tuple[str, str]


@dataclass(frozen=True, slots=True)
class WorkerProgress:
    """A worker's accepted updates of its open round, in acceptance order, from its ``first``
    (the index of ``accepted[0]`` in the round's list)."""

    federation: str
    worker: str
    run: int
    round: int
    base_version: int
    accepted: tuple[Pair, ...]
    collected: bool = False
    rejected: Mapping[str, int] = field(default_factory=dict)
    ts: float = 0.0
    #: Each accepted update's L2 norm, in the same order (for the coordinator's norm bound).
    norms: tuple[float, ...] = ()
    first: int = 0


@dataclass(frozen=True, slots=True)
class ResendRequest:
    """The coordinator asks ``worker`` to report its round's updates again from ``first``."""

    federation: str
    worker: str
    run: int
    round: int
    first: int
    ts: float = 0.0


@dataclass(frozen=True, slots=True)
class NormEstimate:
    """The coordinator's norm estimate for ``round`` (None: not known yet)."""

    federation: str
    run: int
    round: int
    estimate: float | None
    ts: float = 0.0


@dataclass(frozen=True, slots=True)
class CollectRequest:
    """The coordinator closes ``round`` and asks ``workers`` for their partials."""

    federation: str
    run: int
    round: int
    base_version: int
    workers: tuple[str, ...]
    ts: float = 0.0
    #: The norm estimate the round's held updates are released with (None: none known).
    estimate: float | None = None


@dataclass(frozen=True, slots=True)
class WorkerPartial:
    """One worker's share of a round, mergeable with the others' (``PartialSum``)."""

    federation: str
    worker: str
    run: int
    round: int
    base_version: int
    weighted_sum: npt.NDArray[np.float64]
    total_weight: float
    contributors: tuple[Pair, ...]
    rejected: Mapping[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    ts: float = 0.0
    #: Of its updates, how many the norm bound scaled down.
    clipped: int = 0


ClusterMessage = (WorkerProgress | CollectRequest | WorkerPartial | NormEstimate
                  | ResendRequest)


def _pairs(pairs: Sequence[Pair]) -> list[list[str]]:
    return [[d, u] for d, u in pairs]


def encode(msg: ClusterMessage) -> bytes:
    """Serialise a cluster message to msgpack bytes."""
    head: dict[str, Any] = {"v": SCHEMA_VERSION, "fed": msg.federation}
    match msg:
        case WorkerProgress():
            m = head | {"kind": "wprogress", "worker": msg.worker, "run": msg.run,
                        "round": msg.round, "base_version": msg.base_version,
                        "accepted": _pairs(msg.accepted), "collected": msg.collected,
                        "rejected": dict(msg.rejected), "ts": float(msg.ts),
                        "norms": [float(x) for x in msg.norms]} | (
                            {"first": msg.first} if msg.first else {})
        case ResendRequest():
            m = head | {"kind": "wresend", "worker": msg.worker, "run": msg.run,
                        "round": msg.round, "first": msg.first, "ts": float(msg.ts)}
        case CollectRequest():
            m = head | {"kind": "collect", "run": msg.run, "round": msg.round,
                        "base_version": msg.base_version, "workers": list(msg.workers),
                        "ts": float(msg.ts)} | _estimate_map(msg.estimate)
        case NormEstimate():
            m = head | {"kind": "estimate", "run": msg.run, "round": msg.round,
                        "ts": float(msg.ts)} | _estimate_map(msg.estimate)
        case WorkerPartial():
            ws = np.ascontiguousarray(msg.weighted_sum, dtype="<f8")
            m = head | {"kind": "partial", "worker": msg.worker, "run": msg.run,
                        "round": msg.round, "base_version": msg.base_version,
                        "size": int(ws.size), "sum": ws.tobytes(),
                        "total_weight": float(msg.total_weight),
                        "contributors": _pairs(msg.contributors),
                        "rejected": dict(msg.rejected), "bytes_in": int(msg.bytes_in),
                        "ts": float(msg.ts), "clipped": int(msg.clipped)}
        case _:
            raise TypeError(f"not a cluster message: {type(msg).__name__}")
    out: bytes = msgpack.packb(m, use_bin_type=True)
    return out


def _estimate_map(estimate: float | None) -> dict[str, float]:
    return {} if estimate is None else {"estimate": float(estimate)}


def _read_estimate(f: Fields) -> float | None:
    if "estimate" not in f.m:
        return None
    value = f.float_("estimate")
    if value <= 0:
        raise DecodeError(f"{f.where}: estimate must be positive")
    return value


def _read_pairs(f: Fields, key: str, limit: int) -> tuple[Pair, ...]:
    raw = f.list_(key)
    if len(raw) > limit:
        raise DecodeError(f"{f.where}: {key} has more than {limit} entries")
    out: list[Pair] = []
    for p in raw:
        if not (isinstance(p, list) and len(p) == 2 and all(
                isinstance(s, str) and 0 < len(s) <= f.limits.max_string for s in p)):
            raise DecodeError(f"{f.where}: {key} must be a list of [device, update_id] pairs")
        out.append((p[0], p[1]))
    return tuple(out)


def _counts(f: Fields, key: str) -> dict[str, int]:
    raw: Mapping[str, Any] = f.optional(key, f.map_, {})
    if len(raw) > f.limits.max_entries or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in raw.items()):
        raise DecodeError(f"{f.where}: {key} must map reasons to non-negative counts")
    return dict(raw)


def decode(payload: bytes, *, max_pairs: int = 1 << 20, max_params: int = 1 << 31,
           limits: DecodeLimits = DEFAULT_LIMITS) -> ClusterMessage:
    """Decode and check one cluster message; raises ``DecodeError`` and nothing else."""
    if len(payload) > limits.max_payload_bytes:
        raise DecodeError(f"payload of {len(payload)} bytes exceeds the limit of "
                          f"{limits.max_payload_bytes}", reason="oversize")
    try:
        raw = unpack(payload, max_bin_len=limits.max_payload_bytes,
                     max_array_len=max(max_pairs, limits.max_entries))
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise DecodeError(f"not a valid msgpack document: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise DecodeError(f"a fedmq message is a map, got {type(raw).__name__}")
    head = Fields(raw, "message", limits)
    if head.int_("v") != SCHEMA_VERSION:
        raise DecodeError(f"schema version {raw['v']} is not supported")
    kind, fed = head.str_("kind"), head.str_("fed")
    f = Fields(raw, kind, limits)
    if kind == "wprogress":
        accepted = _read_pairs(f, "accepted", max_pairs)
        norms: list[Any] = f.optional("norms", f.list_, [])
        if norms and (len(norms) != len(accepted) or not all(
                isinstance(x, float | int) and not isinstance(x, bool) and 0 <= x < math.inf
                for x in norms)):
            raise DecodeError("wprogress: norms must be one finite norm >= 0 per accepted "
                              "update")
        return WorkerProgress(
            federation=fed, worker=f.str_("worker"), run=f.int_("run"), round=f.int_("round"),
            base_version=f.int_("base_version"),
            accepted=accepted,
            collected=f.optional("collected", f.bool_, False), rejected=_counts(f, "rejected"),
            ts=f.optional("ts", f.float_, 0.0), norms=tuple(float(x) for x in norms),
            first=f.optional("first", f.int_, 0))
    if kind == "wresend":
        return ResendRequest(federation=fed, worker=f.str_("worker"), run=f.int_("run"),
                             round=f.int_("round"), first=f.int_("first"),
                             ts=f.optional("ts", f.float_, 0.0))
    if kind == "collect":
        workers = f.list_("workers")
        if len(workers) > limits.max_entries or not all(
                isinstance(w, str) and 0 < len(w) <= limits.max_string for w in workers):
            raise DecodeError("collect: workers must be a short list of names")
        return CollectRequest(federation=fed, run=f.int_("run"), round=f.int_("round"),
                              base_version=f.int_("base_version"), workers=tuple(workers),
                              ts=f.optional("ts", f.float_, 0.0), estimate=_read_estimate(f))
    if kind == "estimate":
        return NormEstimate(federation=fed, run=f.int_("run"), round=f.int_("round"),
                            estimate=_read_estimate(f), ts=f.optional("ts", f.float_, 0.0))
    if kind == "partial":
        size = f.int_("size", 0, max_params)
        blob = bytes(f.bytes_("sum"))
        if len(blob) != 8 * size:
            raise DecodeError(f"partial: sum holds {len(blob)} bytes, not 8 x {size}")
        ws = np.frombuffer(blob, dtype="<f8").astype(np.float64)
        total = f.float_("total_weight")
        if total < 0:
            raise DecodeError("partial: total_weight is negative")
        return WorkerPartial(
            federation=fed, worker=f.str_("worker"), run=f.int_("run"), round=f.int_("round"),
            base_version=f.int_("base_version"), weighted_sum=ws, total_weight=total,
            contributors=_read_pairs(f, "contributors", max_pairs),
            rejected=_counts(f, "rejected"), bytes_in=f.optional("bytes_in", f.int_, 0),
            ts=f.optional("ts", f.float_, 0.0), clipped=f.optional("clipped", f.int_, 0))
    raise DecodeError(f"unknown cluster message kind {kind!r}")
