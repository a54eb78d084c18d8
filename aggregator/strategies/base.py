"""The part every strategy shares: the streaming fold of a round's updates into ``Σ w·x``.

A strategy never holds a list of updates: each one is folded into a flat float64 accumulator
(``Σ w·x``) the moment it arrives, so memory is O(params) whatever the number of devices.
Folding runs through ``aggregator.kernels`` (this module does not import numba). The fold is the
same for every strategy; they differ only in ``finalize``, which turns the round's mean delta
into the new model (and, for the server optimizers, new optimizer state, adopted by ``commit``).

Order independence is up to float64 rounding: every add rounds at about 1e-16 relative, far below
float32 resolution, so the float32 model is the same whatever the arrival order except when a
value lies within that margin of a float32 rounding boundary.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import numpy.typing as npt

from aggregator.kernels import KERNELS, all_finite_fp32, fold_many
from aggregator.spec import ModelSpec
from fedmq.errors import ProtocolError
from fedmq.wire import Tensor

__all__ = ["F32", "F64", "NoisySum", "PartialSum", "Strategy", "StreamingFold"]

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


@dataclass
class PartialSum:
    """A mergeable round state: ``Σ w·x`` over the flat model, ``Σ w``, and how many updates.

    ``merge`` is associative and commutative (up to float64 rounding) and ``zero`` is its
    identity, so sums can be combined in any grouping: aggregator workers each fold a share of the
    updates and a coordinator merges their partials (scale-out), and an edge gateway forwards one
    partial for its whole site (hierarchies). Both are the same code.
    """

    weighted_sum: F64
    total_weight: float
    contributors: int

    def __post_init__(self) -> None:
        ws = self.weighted_sum
        if not isinstance(ws, np.ndarray) or ws.dtype != np.float64 or ws.ndim != 1:
            raise ValueError("weighted_sum must be a 1-D float64 array")
        if not math.isfinite(self.total_weight) or self.total_weight < 0:
            raise ValueError(f"total_weight must be finite and >= 0; got {self.total_weight!r}")
        if self.contributors < 0:
            raise ValueError(f"contributors must be >= 0; got {self.contributors}")

    @classmethod
    def zero(cls, size: int) -> PartialSum:
        """The empty sum over ``size`` parameters."""
        return cls(np.zeros(size, dtype=np.float64), 0.0, 0)

    def merge(self, other: PartialSum) -> PartialSum:
        """A new partial sum holding both; neither input is modified."""
        if other.weighted_sum.shape != self.weighted_sum.shape:
            raise ValueError(
                f"cannot merge partial sums of {self.weighted_sum.size} and "
                f"{other.weighted_sum.size} parameters"
            )
        return PartialSum(
            self.weighted_sum + other.weighted_sum,
            self.total_weight + other.total_weight,
            self.contributors + other.contributors,
        )


class NoisySum(Protocol):
    """Differential privacy's round (``aggregator.privacy.GaussianSum``): the mean delta is the
    sum plus ``noise(size)``, over a fixed ``denominator`` instead of ``Σ w``."""

    denominator: float

    def noise(self, size: int) -> F64:
        """The round's noise on the sum, a new array (the same bits for the same round)."""
        ...


class Strategy(Protocol):
    """A server aggregation rule, fed one update at a time.

    ``finalize`` computes the round's model without changing anything that outlives the round;
    ``commit`` then adopts the optimizer state that model came with, once the model is accepted
    (a round abandoned after ``finalize`` leaves the state as it was). ``state`` is that
    state, for snapshots; ``load_state`` restores it.
    """

    #: The ``[strategy] name`` it implements.
    name: ClassVar[str]

    def init(self, base: Mapping[str, F32]) -> None:
        """Start a round on ``base`` (the model devices trained from); clears the accumulator
        (not the optimizer state) and drops a finalized round that was not committed."""
        ...

    def fold(self, tensors: Sequence[Tensor], weight: float, scale: float = 1.0) -> None:
        """Add one update (per-tensor deltas, already checked against the spec and finite),
        its values multiplied by ``scale`` (the norm bound's clip factor, in [0, 1])."""
        ...

    def finalize(self) -> dict[str, F32]:
        """The new model, by tensor name in the spec's order; the optimizer state it implies
        is kept aside until ``commit``."""
        ...

    def commit(self) -> None:
        """Adopt the optimizer state of the last ``finalize``: its model was published."""
        ...

    def state(self) -> dict[str, F64]:
        """The committed optimizer state by name (empty for FedAvg), for snapshots."""
        ...

    def load_state(self, arrays: Mapping[str, npt.NDArray[np.float64]]) -> None:
        """Restore what ``state`` gave (a snapshot's)."""
        ...

    def describe(self) -> str:
        """The name and settings, for the log."""
        ...

    def fold_many(self, updates: Sequence[tuple[Sequence[Tensor], float, float]]) -> None:
        """Fold several whole ``(tensors, weight, scale)`` updates at once; the same result as
        ``fold`` on each in order."""
        ...

    def fold_part(self, key: Hashable, tensors: Sequence[Tensor], weight: float,
                  scale: float = 1.0) -> None:
        """Fold one chunk (tensor ranges) of a large update as it arrives."""
        ...

    def settle(self, key: Hashable) -> None:
        """All chunks of ``key`` are in: count it as one whole update."""
        ...

    @property
    def incomplete(self) -> int:
        """Chunked updates folded in part and not settled."""
        ...

    def export_state(self) -> tuple[npt.NDArray[np.float64], float, int,
                                    list[tuple[Hashable, float, list[tuple[int, int]]]]]:
        """The round's running state, for a snapshot."""
        ...

    def import_state(self, acc: npt.NDArray[np.float64], total_weight: float, contributors: int,
                     parts: Sequence[tuple[Hashable, float, Sequence[tuple[int, int]]]]) -> None:
        """Restore a snapshot's running state after ``init`` on the same base."""
        ...

    def partial(self) -> PartialSum:
        """A copy of this round's state, to merge elsewhere or snapshot."""
        ...

    def merge(self, p: PartialSum) -> None:
        """Add a partial sum folded elsewhere (another worker, a gateway, a snapshot)."""
        ...

    @property
    def contributors(self) -> int:
        """Updates folded or merged in this round."""
        ...

    @property
    def total_weight(self) -> float:
        """Sum of their weights."""
        ...


def _positive_weight(weight: float) -> float:
    w = float(weight)
    if not math.isfinite(w) or w <= 0.0:
        raise ValueError(f"weight must be finite and > 0; got {weight!r}")
    return w


def _unit_scale(scale: float) -> float:
    s = float(scale)
    if not 0.0 <= s <= 1.0:  # also refuses NaN
        raise ValueError(f"scale must be in [0, 1]; got {scale!r}")
    return s


def _finite_positive(name: str, value: float) -> float:
    v = float(value)
    if not math.isfinite(v) or v <= 0.0:
        raise ValueError(f"{name} must be finite and > 0; got {value!r}")
    return v


def _fraction(name: str, value: float) -> float:
    """A decay factor in [0, 1)."""
    v = float(value)
    if not 0.0 <= v < 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be in [0, 1); got {value!r}")
    return v


class StreamingFold:
    """The fold every strategy shares; subclasses say how the mean delta moves the model.

    Updates are deltas from the base; ``weight`` is usually the device's ``num_examples``.
    A subclass implements ``_step`` (and names its optimizer state in ``_state``).
    """

    name: ClassVar[str] = ""

    def __init__(self, spec: ModelSpec, server_lr: float) -> None:
        self.spec = spec
        self.server_lr = _finite_positive("server_lr", server_lr)
        # Allocated once and reused every round: memory does not grow with rounds or devices.
        self._acc: F64 = np.zeros(spec.total, dtype=np.float64)
        self._base: F32 = np.zeros(spec.total, dtype=np.float32)
        self._slices = tuple(spec.slices().values())
        self._total_weight = 0.0
        self._contributors = 0
        self._started = False
        # Chunked updates still missing chunks: key -> (weight, [(start, stop), ...]) of the
        # accumulator ranges already folded in. Small: a few ranges per in-flight update.
        self._open_parts: dict[Hashable, tuple[float, list[tuple[int, int]]]] = {}
        # Optimizer state (flat float64, one array per name; it persists across rounds), and
        # the state the last finalize computed, adopted only by commit.
        self._state: dict[str, F64] = {}
        self._staged: dict[str, F64] | None = None
        #: Differential privacy (``aggregator.privacy``): None for the weighted mean.
        self.noisy: NoisySum | None = None

    def _step(self, delta: F64) -> tuple[F64, dict[str, F64]]:
        """The new flat model in float64 from the round's mean delta (``delta`` may be reused
        as its buffer), and the optimizer state after this round; ``_state`` is not changed."""
        raise NotImplementedError

    def describe(self) -> str:
        """The name and settings, e.g. ``fedavg (server_lr 1)``."""
        return f"{self.name} (server_lr {self.server_lr:g})"

    @property
    def contributors(self) -> int:
        """Updates folded or merged in this round."""
        return self._contributors

    @property
    def total_weight(self) -> float:
        """Sum of their weights."""
        return self._total_weight

    def init(self, base: Mapping[str, F32]) -> None:
        """Start a round on ``base``: copy it and zero the accumulator."""
        if set(base) != set(self.spec.names):
            missing = sorted(set(self.spec.names) - set(base))
            extra = sorted(set(base) - set(self.spec.names))
            raise ValueError(f"base does not match the spec: missing {missing}, extra {extra}")
        for name, sl, shape in zip(self.spec.names, self._slices, self.spec.shapes, strict=True):
            a = base[name]
            if a.dtype != np.float32 or a.shape != shape:
                raise ValueError(
                    f"base tensor {name!r} is {a.dtype} {a.shape}; expected float32 {shape}"
                )
            self._base[sl] = a.reshape(-1)
        if not all_finite_fp32(self._base):
            raise ValueError("base model has NaN or inf values")
        self._acc.fill(0.0)
        self._total_weight = 0.0
        self._contributors = 0
        self._open_parts = {}
        self._staged = None  # a finalized round that was not committed was abandoned
        self._started = True

    def fold(self, tensors: Sequence[Tensor], weight: float, scale: float = 1.0) -> None:
        """Add ``weight · scale · tensors`` and count ``weight``; checked whole first, so it
        folds fully or not at all.

        ``scale`` clips the update to the norm bound (``aggregator.robust``): it multiplies the
        weight inside the kernel, so clipping costs no extra pass and no temporary.
        """
        self._require_started("fold")
        w = _positive_weight(weight)
        ws = w * _unit_scale(scale)
        problem = self.spec.check(tensors, codecs=KERNELS.keys())
        if problem is not None:
            raise ValueError(f"update does not match the model: {problem}")
        total = self._total_weight + w
        if not math.isfinite(total):
            raise ValueError("total weight overflowed")
        for t in tensors:
            start = self.spec.offsets[self.spec.index(t.name)] + t.offset
            KERNELS[t.codec].fold(self._acc[start:start + t.span], t, ws)
        self._total_weight = total
        self._contributors += 1

    def fold_many(self, updates: Sequence[tuple[Sequence[Tensor], float, float]]) -> None:
        """Fold several whole updates in one pass over the accumulator (cache-blocked).

        The same sums as ``fold`` on each in order; used when updates queue up, so the
        accumulator's memory traffic is paid once per batch instead of once per update.
        """
        self._require_started("fold_many")
        items: list[list[tuple[Tensor, float]]] = [[] for _ in self.spec.names]
        total = self._total_weight
        for tensors, weight, scale in updates:
            w = _positive_weight(weight)
            ws = w * _unit_scale(scale)
            problem = self.spec.check(tensors, codecs=KERNELS.keys())
            if problem is not None:
                raise ValueError(f"update does not match the model: {problem}")
            total += w
            for t in tensors:
                items[self.spec.index(t.name)].append((t, ws))
        if not math.isfinite(total):
            raise ValueError("total weight overflowed")
        for sl, group in zip(self._slices, items, strict=True):
            fold_many(self._acc[sl], group)
        self._total_weight = total
        self._contributors += len(updates)

    def fold_part(self, key: Hashable, tensors: Sequence[Tensor], weight: float,
                  scale: float = 1.0) -> None:
        """Fold one chunk (tensor ranges) of the update ``key`` as it arrives.

        Until ``settle(key)`` the update counts only on the ranges it delivered: each coordinate
        of the mean is divided by the weight of the contributions that covered it, so a chunked
        update that never completes neither scales nor shifts any other coordinate.
        """
        self._require_started("fold_part")
        w = _positive_weight(weight)
        ws = w * _unit_scale(scale)
        problem = self.spec.check_ranges(tensors, codecs=KERNELS.keys())
        if problem is not None:
            raise ValueError(f"chunk does not match the model: {problem}")
        known = self._open_parts.get(key)
        if known is not None and known[0] != w:
            raise ValueError(f"chunk of {key!r} has weight {w}, earlier chunks {known[0]}")
        ranges = known[1] if known is not None else []
        for t in tensors:
            start = self.spec.offsets[self.spec.index(t.name)] + t.offset
            KERNELS[t.codec].fold(self._acc[start:start + t.span], t, ws)
            ranges.append((start, start + t.span))
        self._open_parts[key] = (w, ranges)

    def settle(self, key: Hashable) -> None:
        """Every chunk of ``key`` is in: it now counts as one whole update."""
        self._require_started("settle")
        w, ranges = self._open_parts.pop(key)
        covered = sum(b - a for a, b in ranges)
        if covered != self.spec.total:
            raise ValueError(f"update {key!r} covers {covered} of {self.spec.total} parameters")
        total = self._total_weight + w
        if not math.isfinite(total):
            raise ValueError("total weight overflowed")
        self._total_weight = total
        self._contributors += 1

    @property
    def incomplete(self) -> int:
        """Chunked updates folded in part and not settled."""
        return len(self._open_parts)

    def mean_delta(self) -> F64:
        """``Σ w·Δ / Σ w`` over the flat model, as a new float64 array.

        Coordinates reached by unsettled chunked updates are divided by their own weight sum.
        With ``noisy`` set (DP): ``(Σ w·Δ + noise) / denominator`` over every coordinate.
        """
        self._require_started("mean_delta")
        if self._contributors == 0 and not self._open_parts:
            raise ProtocolError("no updates in this round: there is nothing to average")
        if self.noisy is not None:
            noisy = self.noisy.noise(self._acc.size)
            noisy += self._acc
            noisy /= self.noisy.denominator
            return noisy
        if not self._open_parts:
            mean: F64 = self._acc / self._total_weight
            return mean
        denom = np.full(self.spec.total, self._total_weight, dtype=np.float64)
        for w, ranges in self._open_parts.values():
            for a, b in ranges:
                denom[a:b] += w
        mean = np.divide(self._acc, denom, out=np.zeros_like(self._acc), where=denom > 0)
        return mean

    def finalize(self) -> dict[str, F32]:
        """The new model, computed in float64 and rounded once to float32; the optimizer state
        it implies waits for ``commit``.

        The arrays are views into one new buffer. Raises ``FloatingPointError`` rather than return
        a model with NaN or inf (a float32 overflow).
        """
        self._require_started("finalize")
        new, state = self._step(self.mean_delta())
        # An out-of-range value becomes inf here; it is reported just below with a clearer message.
        with np.errstate(over="ignore", invalid="ignore"):
            out = new.astype(np.float32)
        if not all_finite_fp32(out):
            raise FloatingPointError("the new model has NaN or inf values (float32 overflow)")
        self._staged = state
        return self.spec.split(out)

    def model64(self) -> F64:
        """The flat model ``finalize`` would round to float32, in float64 (for references and
        tools); nothing is staged."""
        self._require_started("model64")
        return self._step(self.mean_delta())[0]

    def commit(self) -> None:
        """Adopt the optimizer state of the last ``finalize`` (its model was published)."""
        if self._staged is None:
            raise ProtocolError("commit without finalize: there is no new state to adopt")
        self._state, self._staged = self._staged, None

    def state(self) -> dict[str, F64]:
        """The committed optimizer state (the arrays themselves: a commit replaces them, it
        never writes into them)."""
        return dict(self._state)

    def load_state(self, arrays: Mapping[str, npt.NDArray[np.float64]]) -> None:
        """Restore a snapshot's optimizer state: the same names, sizes and finite values."""
        if set(arrays) != set(self._state):
            raise ValueError(f"{self.name} keeps the state {sorted(self._state)}; "
                             f"got {sorted(arrays)}")
        loaded: dict[str, F64] = {}
        for key, a in arrays.items():
            if a.shape != (self.spec.total,) or not np.isfinite(a).all():
                raise ValueError(f"saved state {key!r} has {a.size} values (or non-finite "
                                 f"ones); the model has {self.spec.total}")
            loaded[key] = np.array(a, dtype=np.float64)
        self._state = loaded
        self._staged = None

    def partial(self) -> PartialSum:
        """A copy of the accumulator, total weight and contributor count."""
        self._require_started("partial")
        if self._open_parts:
            raise ProtocolError("partial() with chunked updates still open: settle them first")
        return PartialSum(self._acc.copy(), self._total_weight, self._contributors)

    def merge(self, p: PartialSum) -> None:
        """Add a partial sum over the same spec."""
        self._require_started("merge")
        if p.weighted_sum.shape != self._acc.shape:
            raise ValueError(
                f"partial sum has {p.weighted_sum.size} parameters; the model has {self.spec.total}"
            )
        total = self._total_weight + p.total_weight
        if not math.isfinite(total):
            raise ValueError("total weight overflowed")
        self._acc += p.weighted_sum
        self._total_weight = total
        self._contributors += p.contributors

    def export_state(self) -> tuple[F64, float, int, list[tuple[Hashable, float,
                                                               list[tuple[int, int]]]]]:
        """(accumulator copy, total weight, contributors, open chunked updates) for snapshots."""
        self._require_started("export_state")
        parts = [(key, w, list(ranges)) for key, (w, ranges) in self._open_parts.items()]
        return self._acc.copy(), self._total_weight, self._contributors, parts

    def import_state(self, acc: F64, total_weight: float, contributors: int,
                     parts: Sequence[tuple[Hashable, float, Sequence[tuple[int, int]]]]) -> None:
        """Restore what ``export_state`` gave, after ``init`` on the same base."""
        self._require_started("import_state")
        if acc.shape != self._acc.shape:
            raise ValueError(f"saved accumulator has {acc.size} values; the model {self._acc.size}")
        self._acc[:] = acc
        self._total_weight = float(total_weight)
        self._contributors = int(contributors)
        self._open_parts = {key: (float(w), [(int(a), int(b)) for a, b in ranges])
                            for key, w, ranges in parts}

    def _require_started(self, what: str) -> None:
        if not self._started:
            raise ProtocolError(f"{what} before init(): no round has started")
